"""The demo's service: on a socket taken before the build starts, or in process
(``--no-serve``), with the acceptance check run once it is ready."""

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn

from demo.build import DemoModel
from demo.check import Check, CheckResult, describe_check
from demo.options import DemoError, DemoOptions, Stages, log
from server.app import create_app
from server.settings import ServerSettings

READY_TIMEOUT_S = 120.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the service, taken now so that a busy port is
    refused before minutes of work rather than after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise DemoError(
                f"port {port} on {host} is already in use (another demo or service?): stop "
                "that program, or choose another port with --port"
            ) from None
        raise DemoError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def service_settings(
    options: DemoOptions, model: DemoModel, gallery_dir: Path, data_root: Path
) -> ServerSettings:
    """The service's settings: the demo's model and gallery, and the dataset as its allowed
    root, so that the web page can show the frames the gallery was indexed from."""
    return ServerSettings(
        model_dir=model.model_dir,
        gallery_dir=gallery_dir,
        create_gallery=False,
        backend="auto",
        device="cpu",
        min_detection_score=model.min_score,
        allowed_roots=[data_root],
        host=options.host,
        port=options.port,
    )


async def wait_until_ready(client: httpx.AsyncClient) -> None:
    """Poll ``/readyz`` until the model and the gallery are loaded."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        response = await client.get("/readyz")
        if response.status_code == 200:
            return
        if time.monotonic() > deadline or "loading" not in response.text:
            raise DemoError(f"the service did not get ready: {response.text}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def in_process_client(settings: ServerSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app running in this process, without a socket (``--no-serve``)."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url=f"http://{settings.host}:{settings.port}"
        ) as client,
    ):
        yield client


async def serve(
    settings: ServerSettings, sock: socket.socket, check: Check, stages: Stages
) -> CheckResult | None:
    """Run the service on ``sock`` until Ctrl-C, running ``check(client)`` once it is ready;
    returns the check's result (None when stopped before it finished)."""
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://{settings.host}:{settings.port}"
    with stages.run("service", f"starting {url} and searching the test queries") as stage:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            checking = asyncio.create_task(ready_then_check(client, check))
            await asyncio.wait({serving, checking}, return_when=asyncio.FIRST_COMPLETED)
            if not checking.done():  # the server stopped first (Ctrl-C)
                checking.cancel()
                await serving
                return None
            if checking.exception() is not None:
                server.should_exit = True  # stop serving a system that failed its check
                await serving
            result = checking.result()
        stage.note = f"{url}, {result.right} of {len(result.outcomes)} queries right at rank 1"
    log(f"\n{stages.table()}\n")
    log(describe_check(result, url, serving=True))
    log(f"\npsearch is running: web page {url}/  API docs {url}/docs\nCtrl-C stops it.")
    await serving
    return result


async def ready_then_check(client: httpx.AsyncClient, check: Check) -> CheckResult:
    await wait_until_ready(client)
    return await check(client)


async def check_in_process(settings: ServerSettings, check: Check, stages: Stages) -> CheckResult:
    """``--no-serve``: the check against the app in this process."""
    url = f"http://{settings.host}:{settings.port}"
    with stages.run("service", "in process (--no-serve): searching the test queries") as stage:
        async with in_process_client(settings) as client:
            await wait_until_ready(client)
            result = await check(client)
        stage.note = f"{result.right} of {len(result.outcomes)} queries right at rank 1"
    log(f"\n{stages.table()}\n")
    log(describe_check(result, url, serving=False))
    return result
