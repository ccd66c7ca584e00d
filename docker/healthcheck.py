"""The containers' health check: GET a path of the service on this container, exit 0 when it
answers 200, 1 otherwise (Docker's healthy / unhealthy).

::

    python docker/healthcheck.py /readyz

Standard library only, so that the slim image needs no curl. The port is the service's
(``PSEARCH_PORT``, default 8000); the service listens on every address of the container.
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "8000"
TIMEOUT_S = 4.0


def probe(path: str, port: str) -> str | None:
    """None when ``http://127.0.0.1:<port><path>`` answers 200, else why not."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as error:  # 503 while loading, 409 on a mismatch
        body = error.read(500).decode("utf-8", "replace")
        return f"{url}: HTTP {error.code} {body}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("/"):
        print("usage: healthcheck.py /PATH", file=sys.stderr)
        return 1  # Docker reserves exit status 2
    problem = probe(argv[0], os.environ.get("PSEARCH_PORT", DEFAULT_PORT))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
