import json

from django.db import transaction
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


def _weak_tag(site: Site) -> str:
    return f'W/"{site.last_updated.isoformat()}"'


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
    response["ETag"] = _weak_tag(site)
    return response


def _site_document(site: Site) -> dict[str, object]:
    return {"id": site.pk, "description": site.description, "value": site.value}


@csrf_exempt
def checked_site(request, pk):  # type: ignore[no-untyped-def]
    """A resource written the way NetBox 4.6 writes its own: a weak ETag
    from last_updated on GET and on the update's answer, and If-Match on
    PATCH/DELETE checked under a row lock, weakly (its tags are weak). The
    If-Match it saw is echoed in X-Checked-If-Match."""
    if request.method not in ("PATCH", "DELETE"):
        site = get_object_or_404(Site, pk=pk)
        response = JsonResponse(_site_document(site))
        response["ETag"] = _weak_tag(site)
        return response
    with transaction.atomic():
        site = get_object_or_404(Site.objects.select_for_update(), pk=pk)
        seen = request.headers.get("If-Match")
        if seen is not None:
            tags = [t.strip().removeprefix("W/") for t in seen.split(",")]
            if _weak_tag(site).removeprefix("W/") not in tags and "*" not in tags:
                response = JsonResponse({"detail": "Precondition failed."}, status=412)
                response["X-Checked-If-Match"] = seen
                return response
        if request.method == "DELETE":
            site.delete()
            response = HttpResponse(status=204)
        else:
            data = json.loads(request.body or b"{}")
            site.description = data.get("description", site.description)
            site.value = data.get("value", site.value)
            site.save()
            response = JsonResponse(_site_document(site))
            response["ETag"] = _weak_tag(site)
    response["X-Checked-If-Match"] = seen or ""
    return response


urlpatterns = [
    path("api/", include(router.urls)),
    path("sites/<int:pk>/edit/", site_edit),
    path("legacy/sites/<int:pk>", legacy_site),
    path("checked/sites/<int:pk>", checked_site),
]
