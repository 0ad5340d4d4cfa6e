"""Run the test API: `python -m tests.drf_app.serve` (cwd: the repository).

Creates the sqlite tables at $DRF_APP_DB, binds a free loopback port and
prints `listening on 127.0.0.1:<port>` once it accepts connections. Django's
own threaded HTTP/1.1 server (the one `runserver` uses), without the
autoreloader.
"""

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.drf_app.settings")


def main() -> None:
    import django
    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler, get_internal_wsgi_application

    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # type: ignore[no-untyped-def]
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler)
    server.set_app(get_internal_wsgi_application())
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
