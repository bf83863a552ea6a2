"""gunicorn settings of the API, read by ``gunicorn api.wsgi:app`` started in this folder.

Threaded workers: a long-poll (``GET /jobs/<id>?wait=N``) waits on Redis pub/sub in its own
thread while the others keep answering; with one thread per process a few waiting clients
would stall every request. Flags on the command line (``--bind``, ``--workers``...) override
these. Put a reverse proxy (nginx) in front on a public network: it buffers slow clients.
"""

from shared.settings import Settings

_settings = Settings.from_env()

worker_class = "gthread"
workers = _settings.api_workers
threads = _settings.api_threads
timeout = 60


def post_worker_init(worker) -> None:
    """Errors gunicorn answers itself (request line too long, bad framing) are JSON too; the
    app's one-off costs are paid in the background before the first request needs them."""
    import threading

    from api import warm_up
    from api.server_errors import install

    install()
    threading.Thread(target=warm_up, args=(worker.wsgi,), name="warm-up", daemon=True).start()
