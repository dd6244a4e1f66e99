"""S3-API object store (MinIO, or any S3-compatible server) through the ``minio`` SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlparse

from minio import Minio
from minio.error import S3Error

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, check_key

MIN_PART = 5 * 1024 * 1024  # the S3 minimum for all parts but the last


class S3Store(ObjectStore):
    """Files larger than ``part_size`` go up as multipart uploads (atomic on Complete)."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, *,
                 secure: bool = False, region: str | None = None, part_size: int = 64 * 1024 * 1024,
                 create_bucket: bool = True):
        if part_size < MIN_PART:
            raise ValueError(f"part_size {part_size} is below the S3 minimum of {MIN_PART} bytes")
        self.bucket = bucket
        self.part_size = part_size
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        self._endpoint = endpoint
        if create_bucket and not self.client.bucket_exists(bucket):
            try:
                self.client.make_bucket(bucket)
            except S3Error as e:  # another process created it first
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @classmethod
    def from_url(cls, url: str) -> "S3Store":
        """``s3://ACCESS:SECRET@host:port/bucket?secure=false&region=us-east-1&part_size=N``."""
        u = urlparse(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        bucket = u.path.strip("/")
        if not bucket or not u.hostname:
            raise ValueError(f"storage URL {url!r} needs a host and a bucket: s3://KEY:SECRET@host:port/bucket")
        endpoint = u.hostname + (f":{u.port}" if u.port else "")
        return cls(endpoint, bucket, unquote(u.username or ""), unquote(u.password or ""),
                   secure=q.get("secure", "false").lower() in ("1", "true", "yes"),
                   region=q.get("region"), part_size=int(q.get("part_size", 64 * 1024 * 1024)))

    def __repr__(self) -> str:
        return f"S3Store({self._endpoint!r}, bucket={self.bucket!r})"

    def put_file(self, key: str, path: Path) -> None:
        self.client.fput_object(self.bucket, check_key(key), str(path), part_size=self.part_size)

    def put_bytes(self, key: str, data: bytes) -> None:
        import io

        self.client.put_object(self.bucket, check_key(key), io.BytesIO(data), len(data))

    def _get(self, key: str):
        try:
            return self.client.get_object(self.bucket, check_key(key))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise StorageError(f"get {key}: {e}") from e

    def get_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for chunk in self.iter_chunks(key):
                f.write(chunk)

    def get_bytes(self, key: str) -> bytes:
        resp = self._get(key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        resp = self._get(key)

        def gen():
            try:
                yield from resp.stream(chunk_size)
            finally:
                resp.close()
                resp.release_conn()

        return gen()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, check_key(key))
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise StorageError(f"stat {key}: {e}") from e

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        objs = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
        return iter(sorted((ObjectInfo(o.object_name, o.size or 0) for o in objs), key=lambda o: o.key))

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, check_key(key))

    def ping(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist")
