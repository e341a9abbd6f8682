"""A FLAME node's S3 data through its Kong gateway: objects listed, then each streamed to disk.

On a node, an analysis reaches its data sources only through the node's nginx,
at ``http://nginx-<DEPLOYMENT_NAME>/kong``, with the ``apikey`` header set to
``DATA_SOURCE_TOKEN``: ``GET <source>/s3`` answers an S3 ListBucket (ListObjects
v1) XML page, ``GET <source>/s3/<key>`` the object. These are the routes and the
credentials flamesdk's own data client uses (``DataApiClient.get_data``); the
source names come from the SDK's public ``flame.get_data_sources()``. Unlike the
SDK, which reads every object whole into memory, :class:`GatewayStore` writes each
object to a file in chunks of :data:`CHUNK_BYTES`, follows listing pages past the
first thousand keys, and retries what is transient (connect and read errors,
timeouts, HTTP 5xx and 429) with exponential backoff. A 4xx answer to a GET is final.

No message raised here names an object key: keys may hold patient names, and
the messages may reach the report that leaves the node.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import anyio
import httpx

from asyncflow.enums import InputFailure
from asyncflow.errors import RequestError
from asyncflow.reading.request import FetchFailed, RemoteObject

__all__ = ["CHUNK_BYTES", "GatewayStore", "gateway_url"]

CHUNK_BYTES = 1 << 20  # what one object in flight holds in memory at most
_TIMEOUT = httpx.Timeout(10.0, read=60.0, write=60.0, pool=None)  # read: between two chunks


class _Transient(Exception):
    """A try that may succeed when repeated (its message names no key)."""


def gateway_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The node's gateway, as flamesdk's ``NodeConfig`` finds it: ``nginx-<DEPLOYMENT_NAME>``."""
    deployment = (os.environ if environ is None else environ).get("DEPLOYMENT_NAME")
    return f"http://nginx-{deployment}/kong" if deployment else None


def _status_error(response: httpx.Response) -> Exception | None:
    """None for a 2xx answer; else a transient or a final error, by status."""
    code = response.status_code
    if code < 300:
        return None
    reason = f"the data gateway answered HTTP {code}"
    if code >= 500 or code == 429:
        return _Transient(reason)
    if code == 404:
        return FetchFailed(InputFailure.NOT_FOUND, reason, 1)
    return FetchFailed(InputFailure.FETCH_REFUSED, reason, 1)


class GatewayStore:
    """Lists and fetches S3 objects through a FLAME node's Kong gateway (an async context manager)."""

    def __init__(
        self,
        base_url: str,
        apikey: str | None,
        *,
        tries: int = 4,
        backoff_s: float = 1.0,
        page_size: int | None = None,
    ) -> None:
        self.tries, self.backoff_s, self.page_size = tries, backoff_s, page_size
        headers = {"apikey": apikey} if apikey else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=_TIMEOUT, follow_redirects=True
        )

    async def __aenter__(self) -> GatewayStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.aclose()

    async def _wait(self, tries: int) -> None:
        await anyio.sleep(self.backoff_s * 2 ** (tries - 1))

    # -- listing ------------------------------------------------------------------------

    async def list_objects(
        self, sources: Sequence[str], keys: Collection[str] | None = None
    ) -> list[RemoteObject]:
        """Every object of every source, in listing order (or those whose key is in ``keys``).
        Raises :class:`RequestError` when a source cannot be listed."""
        objects: list[RemoteObject] = []
        for number, source in enumerate(sources, start=1):
            try:
                listed = await self._list_source(source)
            except (_Transient, FetchFailed, ElementTree.ParseError) as exc:
                raise RequestError(
                    f"data source {number} of {len(sources)} could not be listed: {exc}"
                ) from None
            objects += [o for o in listed if keys is None or o.key in keys]
        return objects

    async def _list_source(self, source: str) -> list[RemoteObject]:
        objects: list[RemoteObject] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {}
            if marker is not None:
                params["marker"] = marker
            if self.page_size:
                params["max-keys"] = self.page_size
            page = await self._get_listing(f"/{quote(source, safe='')}/s3", params)
            root = ElementTree.fromstring(page)
            for contents in _children(root, "Contents"):
                key = _text(contents, "Key")
                if key is not None and not key.endswith("/"):  # a "folder" marker holds no data
                    objects.append(RemoteObject(key, int(_text(contents, "Size") or 0), source, self))
            truncated = (_text(root, "IsTruncated") or "false").lower() == "true"
            if not truncated:
                return objects
            following = _text(root, "NextMarker") or (objects[-1].key if objects else None)
            if following is None or following == marker:
                raise _Transient("the listing says it continues but names no next key")
            marker = following

    async def _get_listing(self, path: str, params: dict[str, Any]) -> bytes:
        last = "no try made"
        for tries in range(1, self.tries + 1):
            try:
                response = await self._client.get(path, params=params)
                error = _status_error(response)
                if error is None:
                    return response.content
                raise error
            except _Transient as exc:
                last = str(exc)
            except httpx.TransportError as exc:
                last = type(exc).__name__
            if tries < self.tries:
                await self._wait(tries)
        raise _Transient(f"{last}, on each of {self.tries} tries")

    # -- fetching -------------------------------------------------------------------------

    async def fetch(self, obj: RemoteObject, target: Path) -> int:
        """Stream the object to ``target``; the number of tries it took. Raises :class:`FetchFailed`."""
        path = f"/{quote(obj.source, safe='')}/s3/{quote(obj.key, safe='/')}"
        last = "no try made"
        for tries in range(1, self.tries + 1):
            try:
                await self._stream_to(path, target)
                return tries
            except FetchFailed as exc:
                target.unlink(missing_ok=True)
                raise FetchFailed(exc.failure, str(exc), tries) from None
            except _Transient as exc:
                last = str(exc)
            except httpx.TransportError as exc:  # connect, read, timeout, a body cut short
                last = type(exc).__name__
            target.unlink(missing_ok=True)
            if tries < self.tries:
                await self._wait(tries)
        raise FetchFailed(InputFailure.FETCH_FAILED, f"{last}, on each of {self.tries} tries", self.tries)

    async def _stream_to(self, path: str, target: Path) -> None:
        async with self._client.stream("GET", path) as response:
            error = _status_error(response)
            if error is not None:
                raise error
            target.parent.mkdir(parents=True, exist_ok=True)
            async with await anyio.open_file(target, "wb") as file:
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    await file.write(chunk)


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """Child elements named ``name`` in any (or no) XML namespace."""
    return [child for child in element if child.tag.rpartition("}")[2] == name]


def _text(element: ElementTree.Element, name: str) -> str | None:
    found = _children(element, name)
    return found[0].text if found else None
