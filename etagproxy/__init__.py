"""etagproxy: strong ETags and RFC 9110 conditional requests for APIs that have none."""

__version__ = "0.1.0"
