"""S3-API object store (MinIO, or any S3-compatible server) through the ``minio`` SDK."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlparse

from minio import Minio
from minio.error import S3Error

from .base import DirectUpload, ObjectInfo, ObjectNotFound, ObjectStore, StorageError, check_key

MIN_PART = 5 * 1024 * 1024  # the S3 minimum for all parts but the last


class S3Store(ObjectStore):
    """Files larger than ``part_size`` go up as multipart uploads (atomic on Complete)."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, *,
                 secure: bool = False, region: str | None = None, part_size: int = 64 * 1024 * 1024,
                 create_bucket: bool = True, public_url: str | None = None):
        if part_size < MIN_PART:
            raise ValueError(f"part_size {part_size} is below the S3 minimum of {MIN_PART} bytes")
        self.bucket = bucket
        self.part_size = part_size
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        self._endpoint = endpoint
        self._keys = (access_key, secret_key)
        # URLs handed to clients are signed for the address clients use (e.g. not compose's "minio:9000")
        pub = urlparse(public_url) if public_url else None
        self._signer = Minio(pub.netloc, access_key=access_key, secret_key=secret_key, secure=pub.scheme == "https",
                             region=region or "us-east-1") if pub else \
            Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region or "us-east-1")
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
                   region=q.get("region"), part_size=int(q.get("part_size", 64 * 1024 * 1024)),
                   public_url=q.get("public_url"))

    def for_bucket(self, bucket: str) -> "S3Store":
        """The same server and credentials, another bucket (imports from a granted prefix)."""
        s = S3Store.__new__(S3Store)
        s.__dict__.update(self.__dict__, bucket=bucket)
        return s

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

    def size(self, key: str) -> int:
        try:
            return int(self.client.stat_object(self.bucket, check_key(key)).size or 0)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise ObjectNotFound(key) from None
            raise StorageError(f"stat {key}: {e}") from e

    def presign_get(self, key: str, expires_s: int) -> str:
        return self._signer.presigned_get_object(self.bucket, check_key(key), expires=timedelta(seconds=expires_s))

    def start_direct_upload(self, key: str, size: int, expires_s: int) -> DirectUpload:
        """One presigned PUT up to ``part_size``; above it a multipart upload, a URL per part."""
        key, ttl = check_key(key), timedelta(seconds=expires_s)
        if size <= self.part_size:
            return DirectUpload(key, None, self.part_size, (self._signer.presigned_put_object(self.bucket, key, ttl),))
        upload_id = self.client._create_multipart_upload(self.bucket, key, {})
        n = -(-size // self.part_size)
        urls = tuple(self._signer.get_presigned_url("PUT", self.bucket, key, ttl, extra_query_params={
            "uploadId": upload_id, "partNumber": str(i)}) for i in range(1, n + 1))
        return DirectUpload(key, upload_id, self.part_size, urls)

    def finish_direct_upload(self, upload: DirectUpload) -> None:
        if upload.upload_id is None:
            return
        try:
            parts = self.client._list_parts(self.bucket, upload.key, upload.upload_id).parts
            if sorted(p.part_number for p in parts) != list(range(1, len(upload.urls) + 1)):
                raise StorageError(f"{upload.key}: {len(parts)} of {len(upload.urls)} parts were uploaded")
            self.client._complete_multipart_upload(self.bucket, upload.key, upload.upload_id,
                                                   sorted(parts, key=lambda p: p.part_number))
        except S3Error as e:
            raise StorageError(f"{upload.key}: cannot complete the upload ({e.code})") from None

    def abort_direct_upload(self, upload: DirectUpload) -> None:
        if upload.upload_id is not None:
            try:
                self.client._abort_multipart_upload(self.bucket, upload.key, upload.upload_id)
            except S3Error:
                pass  # already completed or aborted
        try:
            self.client.remove_object(self.bucket, upload.key)
        except S3Error:
            pass

    def ping(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist")
