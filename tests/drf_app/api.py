"""Serializers, viewsets and the router: the NetBox pattern in miniature."""

from django.db import transaction
from rest_framework import routers, serializers, status, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from .models import Device, Site


class SiteSerializer(serializers.ModelSerializer):
    # Like NetBox's site serializer: no `url` in the body, so DRF sends no
    # Location on create, and a count computed from other rows.
    device_count = serializers.SerializerMethodField()

    class Meta:
        model = Site
        fields = ["id", "name", "description", "value", "device_count", "last_updated"]

    def get_device_count(self, obj: Site) -> int:
        return obj.devices.count()


class DeviceSerializer(serializers.ModelSerializer):
    # A `url` field: DRF's create answers 201 with Location set to it.
    url = serializers.HyperlinkedIdentityField(view_name="device-detail")

    class Meta:
        model = Device
        fields = ["id", "url", "name", "site"]


class BulkMixin:
    """NetBox's bulk operations on the list endpoint: a JSON array of
    objects each carrying `id`, applied in one transaction."""

    def _bulk_objects(self, request):  # type: ignore[no-untyped-def]
        if not isinstance(request.data, list) or not all(isinstance(o, dict) and "id" in o for o in request.data):
            raise ValidationError("expected a list of objects with an id")
        ids = [o["id"] for o in request.data]
        found = {obj.pk: obj for obj in self.get_queryset().filter(pk__in=ids)}  # type: ignore[attr-defined]
        missing = [i for i in ids if i not in found]
        if missing:
            raise ValidationError(f"objects not found: {missing}")
        return [(found[o["id"]], o) for o in request.data]

    def bulk_update(self, request, partial=False):  # type: ignore[no-untyped-def]
        with transaction.atomic():
            out = []
            for obj, data in self._bulk_objects(request):
                s = self.get_serializer(obj, data=data, partial=partial)  # type: ignore[attr-defined]
                s.is_valid(raise_exception=True)
                s.save()
                out.append(s.data)
        return Response(out)

    def bulk_partial_update(self, request):  # type: ignore[no-untyped-def]
        return self.bulk_update(request, partial=True)

    def bulk_destroy(self, request):  # type: ignore[no-untyped-def]
        with transaction.atomic():
            for obj, _ in self._bulk_objects(request):
                obj.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class SiteViewSet(BulkMixin, viewsets.ModelViewSet):
    queryset = Site.objects.all()
    serializer_class = SiteSerializer


class DeviceViewSet(BulkMixin, viewsets.ModelViewSet):
    queryset = Device.objects.all()
    serializer_class = DeviceSerializer


class BulkRouter(routers.DefaultRouter):
    """NetBox's router: PUT/PATCH/DELETE on a list endpoint are bulk."""

    def get_method_map(self, viewset, method_map):  # type: ignore[no-untyped-def]
        if method_map.get("get") == "list":
            method_map = {**method_map, "put": "bulk_update", "patch": "bulk_partial_update",
                          "delete": "bulk_destroy"}
        return super().get_method_map(viewset, method_map)


router = BulkRouter()
router.register("sites", SiteViewSet)
router.register("devices", DeviceViewSet)
