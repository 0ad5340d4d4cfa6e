from django.db import models


class Site(models.Model):
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=200, blank=True, default="")
    value = models.IntegerField(default=0)
    last_updated = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "drf_app"
        ordering = ["id"]


class Device(models.Model):
    name = models.CharField(max_length=100)
    site = models.ForeignKey(Site, related_name="devices", on_delete=models.CASCADE)

    class Meta:
        app_label = "drf_app"
        ordering = ["id"]
