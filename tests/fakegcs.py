"""A Google Cloud Storage stand-in for tests: the JSON API over local HTTP, objects in memory.

The real clients talk to it unchanged, pointed at it by the environment variables they read
for emulators (``FakeGCS.env``): gcsfs (what ``etils.epath`` uses for ``gs://``: run files)
and tensorstore (what orbax writes arrays with: checkpoints). So a test of a ``gs://`` run
directory exercises the same client code a Cloud TPU worker runs, with no network.

It serves what those clients use: object metadata and media (with byte ranges), simple,
multipart and resumable uploads, listing with prefix/delimiter/offsets, delete, rewrite/copy,
and batched deletes, all with generation preconditions (tensorstore relies on them for
atomic writes). Buckets are fixed at construction; anything else is a 404.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import http.server
import itertools
import json
import re
import threading
import time
import urllib.parse
from typing import Any


class _Stop(Exception):
    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message


class FakeGCS:
    """An in-memory GCS served on 127.0.0.1; use as a context manager.

    Args:
      buckets: the buckets that exist.
    """

    def __init__(self, buckets: tuple[str, ...] = ("bucket",)):
        self.buckets = set(buckets)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path", for debugging a failing test
        self._generation = int(time.time() * 1e6)
        self._uploads: dict[str, dict[str, Any]] = {}
        # Upload ids are never reused: a count of the uploads in flight (the old scheme) gave a
        # new upload the id of one still running once another had finished, so concurrent
        # orbax writes after a preemption (which leaves an upload dangling) could collide.
        self._upload_ids = itertools.count(1)
        self._server: http.server.ThreadingHTTPServer | None = None
        # Freezing (a preemption at a known point): see pause_after.
        self._pause: re.Pattern[str] | None = None
        self._open = threading.Event()
        self._open.set()
        self._era = 0
        self.paused = threading.Event()

    def pause_after(self, pattern: str) -> None:
        """After the first write of an object whose ``gs://`` path matches ``pattern`` (a
        regular expression, searched), every later request waits: the bucket then holds
        exactly what was written up to that object, however fast the client is. Kill the
        client, then call ``resume()``: the requests that waited are dropped unanswered,
        as a preempted machine's would be."""
        self._pause = re.compile(pattern)
        self.paused.clear()

    def resume(self) -> None:
        self._pause = None
        self._era += 1
        self._open.set()

    # ---- test-side access -------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points gcsfs and tensorstore (in this or a child process) here."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (no metadata server)
            # gcsfs's bucket-type probe speaks gRPC to the storage-control API, not served here.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # tensorstore: skip credentials
        }

    def read(self, path: str) -> bytes:
        """The bytes of ``gs://bucket/name``; KeyError if there is no such object."""
        bucket, _, name = path.removeprefix("gs://").partition("/")
        with self.lock:
            return self.objects[(bucket, name)]["data"]

    def exists(self, path: str) -> bool:
        bucket, _, name = path.removeprefix("gs://").partition("/")
        with self.lock:
            return (bucket, name) in self.objects

    def names(self, prefix: str = "gs://") -> list[str]:
        """Every object's ``gs://`` path that starts with ``prefix``, sorted."""
        with self.lock:
            paths = [f"gs://{b}/{n}" for b, n in self.objects]
        return sorted(p for p in paths if p.startswith(prefix))

    def __enter__(self) -> FakeGCS:
        owner = self

        class Handler(_Handler):
            gcs = owner

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # ---- storage ----------------------------------------------------------------------------

    def _meta(self, bucket: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        data = obj["data"]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(obj["time"]))
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{obj['generation']}",
            "name": name,
            "bucket": bucket,
            "generation": str(obj["generation"]),
            "metageneration": "1",
            "contentType": obj["content_type"],
            "size": str(len(data)),
            "md5Hash": obj["md5"],
            "timeCreated": stamp,
            "updated": stamp,
            "storageClass": "STANDARD",
        }

    def _check_bucket(self, bucket: str) -> None:
        if bucket not in self.buckets:
            raise _Stop(404, f"bucket {bucket} not found")

    def _preconditions(self, query: dict[str, str], current: dict[str, Any] | None) -> None:
        generation = current["generation"] if current else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            raise _Stop(412, "precondition failed: ifGenerationMatch")
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            raise _Stop(304 if current else 412, "not modified")
        if "ifMetagenerationMatch" in query and current and query["ifMetagenerationMatch"] != "1":
            raise _Stop(412, "precondition failed: ifMetagenerationMatch")

    def _get(self, bucket: str, name: str, query: dict[str, str]) -> dict[str, Any]:
        self._check_bucket(bucket)
        obj = self.objects.get((bucket, name))
        if "generation" in query and obj and int(query["generation"]) != obj["generation"]:
            obj = None
        self._preconditions(query, obj)
        if obj is None:
            raise _Stop(404, f"no such object: {bucket}/{name}")
        return obj

    def _put(
        self, bucket: str, name: str, data: bytes, query: dict[str, str], content_type: str
    ) -> dict[str, Any]:
        self._check_bucket(bucket)
        if not name:
            raise _Stop(400, "an object needs a name")
        with self.lock:
            self._preconditions(query, self.objects.get((bucket, name)))
            self._generation += 1
            obj = {
                "data": bytes(data),
                "generation": self._generation,
                "time": time.time(),
                "content_type": content_type or "application/octet-stream",
                "md5": _b64(hashlib.md5(data).digest()),
            }
            self.objects[(bucket, name)] = obj
            if self._pause is not None and self._pause.search(f"gs://{bucket}/{name}"):
                self._pause = None
                self._open.clear()
                self.paused.set()
        return self._meta(bucket, name, obj)

    def _delete(self, bucket: str, name: str, query: dict[str, str]) -> None:
        with self.lock:
            self._get(bucket, name, query)
            del self.objects[(bucket, name)]

    def _list(self, bucket: str, query: dict[str, str]) -> dict[str, Any]:
        self._check_bucket(bucket)
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset", "")
        items, prefixes = [], set()
        with self.lock:
            found = sorted((n, o) for (b, n), o in self.objects.items() if b == bucket)
        for name, obj in found:
            if not name.startswith(prefix) or name < start or (end and name >= end):
                continue
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            items.append(self._meta(bucket, name, obj))
        out: dict[str, Any] = {"kind": "storage#objects", "items": items}
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        return out


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$")
_OBJECTS = re.compile(r"^/(?:upload/)?storage/v1/b/([^/]+)/o/?$")
_BUCKET = re.compile(r"^/storage/v1/b/([^/]+)/?$")
_COPY = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)$")
_MOVE = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/moveTo/o/(.+)$")


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up early
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    gcs: FakeGCS
    protocol_version = "HTTP/1.1"  # keep-alive, as both clients expect

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass  # quiet: the test's own output is what matters

    # ---- plumbing -----------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if code not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD" and code not in (204, 304):
            self.wfile.write(body)

    def _json(self, code: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            code,
            json.dumps(value).encode(),
            {"Content-Type": "application/json; charset=UTF-8", **(headers or {})},
        )

    def _route(self) -> None:
        era = self.gcs._era
        self.gcs._open.wait()
        if era != self.gcs._era:  # it waited through a pause: its client is gone
            self.close_connection = True
            return
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        self.gcs.requests.append(f"{self.command} {url.path}?{url.query}")
        body = self._body() if self.command in ("POST", "PUT", "PATCH") else b""
        try:
            self._dispatch(url.path, query, body)
        except _Stop as stop:
            if stop.code == 304:
                self._send(304)
            else:
                error = {"error": {"code": stop.code, "message": stop.message}}
                self._json(stop.code, error)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _route

    # ---- the API ------------------------------------------------------------------------------

    def _dispatch(self, path: str, query: dict[str, str], body: bytes) -> None:
        gcs = self.gcs
        if path == "/batch/storage/v1" and self.command == "POST":
            return self._batch(body)
        if m := _MOVE.match(path):
            bucket, src, dst = m.group(1), _unquote(m.group(2)), _unquote(m.group(3))
            with gcs.lock:
                obj = gcs._get(bucket, src, {})
            dst_q = {k: v for k, v in query.items() if k == "ifGenerationMatch"}
            meta = gcs._put(bucket, dst, obj["data"], dst_q, obj["content_type"])
            gcs._delete(bucket, src, {})
            return self._json(200, meta)
        if m := _COPY.match(path):
            if self.command != "POST":
                raise _Stop(405)
            src_b, src_n, how, dst_b, dst_n = m.groups()
            obj = gcs._get(src_b, _unquote(src_n), {})
            dst_q = {k: v for k, v in query.items() if k == "ifGenerationMatch"}
            meta = gcs._put(dst_b, _unquote(dst_n), obj["data"], dst_q, obj["content_type"])
            if how == "copyTo":
                return self._json(200, meta)
            size = meta["size"]
            return self._json(
                200,
                {
                    "kind": "storage#rewriteResponse",
                    "done": True,
                    "totalBytesRewritten": size,
                    "objectSize": size,
                    "resource": meta,
                },
            )
        if path.startswith("/upload/"):
            return self._upload(path, query, body)
        if m := _OBJECT.match(path):
            bucket, name = m.group(1), _unquote(m.group(2))
            if self.command == "DELETE":
                gcs._delete(bucket, name, query)
                return self._send(204)
            if self.command in ("GET", "HEAD"):
                with gcs.lock:
                    obj = gcs._get(bucket, name, query)
                if query.get("alt") == "media":
                    return self._media(bucket, name, obj)
                return self._json(200, gcs._meta(bucket, name, obj))
            if self.command == "PATCH":
                with gcs.lock:
                    obj = gcs._get(bucket, name, query)
                return self._json(200, gcs._meta(bucket, name, obj))
            raise _Stop(405)
        if m := _OBJECTS.match(path):
            if self.command == "GET":
                return self._json(200, gcs._list(m.group(1), query))
            raise _Stop(405)
        if m := _BUCKET.match(path):
            gcs._check_bucket(m.group(1))
            return self._json(200, {"kind": "storage#bucket", "name": m.group(1), "id": m.group(1)})
        raise _Stop(404, f"fake GCS does not serve {self.command} {path}")

    def _media(self, bucket: str, name: str, obj: dict[str, Any]) -> None:
        data = obj["data"]
        headers = {
            "Content-Type": obj["content_type"],
            "x-goog-generation": str(obj["generation"]),
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(len(data)),
            "x-goog-hash": f"md5={obj['md5']}",
            "ETag": f'"{obj["generation"]}"',
        }
        ranged = self.headers.get("Range")
        if not ranged:
            return self._send(200, data, headers)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", ranged.strip())
        if not m:
            raise _Stop(400, f"bad Range {ranged}")
        first, last = m.groups()
        if first == "":
            first_i, last_i = max(0, len(data) - int(last)), len(data) - 1
        else:
            first_i = int(first)
            last_i = min(int(last), len(data) - 1) if last else len(data) - 1
        if first_i >= len(data) and len(data) > 0:
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {first_i}-{last_i}/{len(data)}"
        self._send(206, data[first_i : last_i + 1], headers)

    def _upload(self, path: str, query: dict[str, str], body: bytes) -> None:
        gcs = self.gcs
        m = _OBJECTS.match(path)
        if not m:
            raise _Stop(404, f"fake GCS does not serve uploads to {path}")
        bucket = m.group(1)
        kind = query.get("uploadType", "media")
        ctype = self.headers.get("Content-Type", "")
        if kind == "media":
            return self._json(200, gcs._put(bucket, query.get("name", ""), body, query, ctype))
        if kind == "multipart":
            meta, data, data_type = _multipart_related(ctype, body)
            name = meta.get("name") or query.get("name", "")
            put = gcs._put(bucket, name, data, query, meta.get("contentType") or data_type)
            return self._json(200, put)
        if kind != "resumable":
            raise _Stop(400, f"uploadType {kind}")
        if "upload_id" not in query:  # start: remember where it goes, answer with its URL
            meta = json.loads(body or b"{}")
            with gcs.lock:
                upload_id = f"u{next(gcs._upload_ids)}"
            gcs._uploads[upload_id] = {
                "bucket": bucket,
                "name": meta.get("name") or query.get("name", ""),
                "query": query,
                "type": meta.get("contentType", ""),
                "data": bytearray(),
            }
            location = f"{gcs.url}{path}?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        upload = gcs._uploads.get(query.get("upload_id", ""))
        if upload is None:
            raise _Stop(404, "no such upload")
        rng = self.headers.get("Content-Range", "")
        upload["data"] += body
        total = rng.rsplit("/", 1)[-1] if "/" in rng else str(len(upload["data"]))
        if total == "*" or int(total) > len(upload["data"]):
            got = len(upload["data"])
            headers = {"Range": f"bytes=0-{got - 1}"} if got else {}
            return self._send(308, b"", headers)
        put = gcs._put(
            upload["bucket"], upload["name"], bytes(upload["data"]), upload["query"], upload["type"]
        )
        del gcs._uploads[query["upload_id"]]
        return self._json(200, put)

    def _batch(self, body: bytes) -> None:
        """Batched deletes (gcsfs's rm): each part is an HTTP request; answered in order."""
        boundary = self.headers.get("Content-Type", "").split("boundary=", 1)[-1].strip('"')
        answers = []
        for part in body.decode().split("--" + boundary)[1:]:
            m = re.search(r"^(DELETE) (\S+) HTTP/1\.1", part, re.M)
            if not m:
                continue
            url = urllib.parse.urlsplit(m.group(2))
            query = dict(urllib.parse.parse_qsl(url.query))
            o = _OBJECT.match(url.path)
            try:
                if not o:
                    raise _Stop(404)
                self.gcs._delete(o.group(1), _unquote(o.group(2)), query)
                status = "204 No Content"
            except _Stop as stop:
                status = f"{stop.code} Error"
            answers.append(
                "Content-Type: application/http\r\n\r\n"
                f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n"
            )
        out = "batch_fake"
        text = "".join(f"--{out}\r\n{a}" for a in answers) + f"--{out}--\r\n"
        self._send(200, text.encode(), {"Content-Type": f"multipart/mixed; boundary={out}"})


def _unquote(name: str) -> str:
    return urllib.parse.unquote(name)


def _multipart_related(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes, str]:
    """The JSON metadata part and the data part of a multipart/related upload."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts = list(message.iter_parts())
    if len(parts) != 2:
        raise _Stop(400, "a multipart upload has a metadata part and a data part")
    meta = json.loads(parts[0].get_payload(decode=True) or b"{}")
    return meta, parts[1].get_payload(decode=True) or b"", parts[1].get_content_type()
