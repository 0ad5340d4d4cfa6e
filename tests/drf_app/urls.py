import json

from django.http import HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from .api import router
from .models import Site


@csrf_exempt
def site_edit(request, pk):  # type: ignore[no-untyped-def]
    """The web UI's edit form: a POST that bypasses the API and answers
    Post/Redirect/Get with Django's redirect (302)."""
    site = get_object_or_404(Site, pk=pk)
    if request.method != "POST":
        return HttpResponse(f"<form method=post><input name=description value='{site.description}'></form>")
    site.description = request.POST.get("description", site.description)
    if "value" in request.POST:
        site.value = int(request.POST["value"])
    site.save()
    return HttpResponseRedirect(f"/api/sites/{pk}/")


@csrf_exempt
def legacy_site(request, pk):  # type: ignore[no-untyped-def]
    """A JSON resource whose PUT applies the change and answers 303 See
    Other to the canonical URL (Post/Redirect/Get on an API), and whose GET
    carries the upstream's own weak ETag."""
    site = get_object_or_404(Site, pk=pk)
    if request.method == "PUT":
        data = json.loads(request.body or b"{}")
        site.description = data.get("description", site.description)
        site.value = data.get("value", site.value)
        site.save()
        response = HttpResponseRedirect(f"/legacy/sites/{pk}")
        response.status_code = 303
        return response
    response = JsonResponse({"id": site.pk, "description": site.description, "value": site.value})
    # Its own validator, the way NetBox 4.6 sends one: weak, from last_updated.
    response["ETag"] = f'W/"{site.last_updated.isoformat()}"'
    return response


urlpatterns = [
    path("api/", include(router.urls)),
    path("sites/<int:pk>/edit/", site_edit),
    path("legacy/sites/<int:pk>", legacy_site),
]
