"""A small Django REST Framework API shaped like NetBox's, run by the tests.

Sites and devices (a device belongs to a site; a site shows its
`device_count`, computed from other rows), ModelViewSets on a router that
also takes NetBox's bulk PUT/PATCH/DELETE on list endpoints, DRF's browsable
API (`Vary: Accept`, `?format=api`), and a web-form edit that bypasses the
API and answers with a redirect. `serve.py` runs it on a free loopback port.
"""
