"""An S3 object store (boto3): AWS or any S3-compatible endpoint (MinIO, Ceph, moto...).

Same semantics as LocalStore: keys are checked by the same rules, an object is whole (an S3 PUT
or a completed multipart upload is atomic: readers see the old object or the new one), ``list``
matches a string prefix, ``delete`` of a missing key answers False. Every boto3 call blocks, so
each runs in a thread. The sha256 of an object travels as its user metadata ``sha256``; objects
written by other tools without it are hashed once when first asked.

``sse`` (and ``kms_key_id``) ask S3 to encrypt each object on its side as well; Atoll's own sealing
(sealed_store.py) happens before the bytes leave the host either way.

Credentials never sit in config files: ``access_key_env`` / ``secret_key_env`` name the
environment variables that hold them, or, left out, boto3's default chain applies
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from pathlib import Path
from typing import IO, Any, Literal

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from atoll.agent.transfer import READ_SIZE, sha256_file, write_and_hash
from atoll.plugins.storage.store import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    check_key,
    check_prefix,
)

SPOOL_MEMORY = 8 * 1024 * 1024  # a streamed put is held in memory up to this, then on disk
MIN_PART = 5 * 1024 * 1024  # S3's smallest multipart part
SECRET_KEYS = {"access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "token"}
NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Config(BaseModel):
    """``[plugins.storage.s3]``."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    endpoint_url: str | None = None  # None: AWS (or AWS_ENDPOINT_URL)
    region: str | None = None
    prefix: str = ""  # this store's keys live under it in the bucket ("atoll/")
    access_key_env: str | None = None  # names of environment variables, never the secrets
    secret_key_env: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"  # MinIO and Ceph: "path"
    create_bucket: bool = False  # create the bucket at start if it is missing
    multipart_threshold: int = Field(64 * 1024 * 1024, ge=MIN_PART)
    multipart_chunksize: int = Field(16 * 1024 * 1024, ge=MIN_PART)
    # Server-side encryption S3 applies too (objects are sealed before they leave the host
    # anyway, see sealed_store.py): "AES256" with S3's keys, or "aws:kms" with kms_key_id (a
    # KMS key id or ARN; left out, the account's default KMS key).
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = Field(None, min_length=1, max_length=2048)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and SECRET_KEYS & {str(k).lower() for k in data}:
            raise ValueError(
                "credentials never go in config files: set access_key_env and secret_key_env "
                "to the names of environment variables holding them, or leave both out for "
                "boto3's default chain (AWS_ACCESS_KEY_ID, profiles, instance roles)"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> S3Config:
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("set both access_key_env and secret_key_env, or neither")
        if self.kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError('kms_key_id is for sse = "aws:kms"')
        if self.prefix:
            check_key(self.prefix.removesuffix("/"))
            if not self.prefix.endswith("/"):
                self.prefix += "/"
        return self


class S3Unavailable(OSError):
    """The bucket cannot be used: missing, refused, unreachable, or credentials absent."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    kind = "s3"

    def __init__(self, config: S3Config, spool_dir: Path | None = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.spool_dir = None if spool_dir is None else str(spool_dir)  # tempfile's type
        self.where = f"s3 bucket {config.bucket!r}" + (
            f" at {config.endpoint_url}" if config.endpoint_url else ""
        )
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            **_credentials(config),
            config=BotoConfig(
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 4, "mode": "standard"},
                s3={"addressing_style": config.addressing_style},
                # Checksums only where S3 demands them: many S3-compatible servers reject the
                # CRC headers newer boto3 versions send by default.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold,
            multipart_chunksize=config.multipart_chunksize,
        )
        self._digests: dict[str, tuple[str, str]] = {}  # key -> (etag, sha256), for foreign ones
        self.encryption: dict[str, str] = {}  # boto3's ExtraArgs for server-side encryption
        if config.sse:
            self.encryption["ServerSideEncryption"] = config.sse
        if config.kms_key_id:
            self.encryption["SSEKMSKeyId"] = config.kms_key_id

    async def open(self) -> None:
        """Check the bucket can be reached (creating it if configured to); S3Unavailable with
        the reason otherwise."""
        try:
            await asyncio.to_thread(self.client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND and self.config.create_bucket:
                await asyncio.to_thread(self._create_bucket)
            elif _code(exc) in NOT_FOUND:
                raise S3Unavailable(f"{self.where} does not exist") from None
            elif _code(exc) in ("403", "AccessDenied"):
                raise S3Unavailable(f"{self.where}: access denied with these credentials") from None
            else:
                raise S3Unavailable(f"{self.where}: {exc}") from None
        except BotoCoreError as exc:  # unreachable endpoint, no credentials found...
            raise S3Unavailable(f"{self.where}: {exc}") from None

    def _create_bucket(self) -> None:
        region = self.client.meta.region_name
        extra = {}
        if region and region != "us-east-1":  # S3 refuses a location constraint of us-east-1
            extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self.client.create_bucket(Bucket=self.bucket, **extra)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, action: str, key: str, exc: Exception) -> S3Unavailable:
        return S3Unavailable(f"{action} {key!r} in {self.where} failed: {exc}")

    # --- writing ------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        self._name(key)  # the key's checks, before any work
        with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=self.spool_dir) as spool:
            digest = hashlib.sha256()
            if isinstance(data, bytes | bytearray | memoryview):
                await asyncio.to_thread(write_and_hash, spool, digest, bytes(data))
            else:  # gathered first: a source that fails part-way leaves the old object alone
                async for chunk in data:
                    await asyncio.to_thread(write_and_hash, spool, digest, chunk)
            spool.seek(0)
            await self._upload(key, self.client.upload_fileobj, spool, digest.hexdigest())
        return await self.stat(key)

    async def put_file(self, key: str, path: Path) -> ObjectInfo:
        self._name(key)  # the key's checks, before any work
        sha = (await asyncio.to_thread(sha256_file, Path(path))).hexdigest()
        await self._upload(key, self.client.upload_file, str(path), sha)
        return await self.stat(key)

    async def _upload(
        self, key: str, upload: Callable[..., None], source: IO[bytes] | str, sha: str
    ) -> None:
        """``upload`` (boto3's upload_file or upload_fileobj) of ``source``: one PUT, or a
        multipart upload past the threshold, which boto3 aborts on failure."""
        try:
            await asyncio.to_thread(
                upload,
                source,
                self.bucket,
                self._name(key),
                ExtraArgs={"Metadata": {"sha256": sha}, **self.encryption},
                Config=self.transfer,
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from None
        self._digests.pop(key, None)

    # --- reading ------------------------------------------------------------------------------

    async def read(self, key: str) -> AsyncGenerator[bytes, None]:
        name = self._name(key)
        try:
            reply = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                raise ObjectNotFound(f"no object {key!r}") from None
            raise self._fail("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("read", key, exc) from None
        body = reply["Body"]
        try:
            while block := await asyncio.to_thread(body.read, READ_SIZE):
                yield block
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("read", key, exc) from None
        finally:
            body.close()

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(
                self.client.head_object, Bucket=self.bucket, Key=self._name(key)
            )
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise self._fail("stat", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("stat", key, exc) from None

    async def stat(self, key: str) -> ObjectInfo:
        head = await self._head(key)
        if head is None:
            raise ObjectNotFound(f"no object {key!r}")
        sha = head.get("Metadata", {}).get("sha256")
        if sha is None:  # written by another tool: hash it once per version (ETag)
            etag = str(head.get("ETag"))
            cached = self._digests.get(key)
            if cached is None or cached[0] != etag:
                digest = hashlib.sha256()
                async for block in self.read(key):
                    digest.update(block)
                cached = self._digests[key] = (etag, digest.hexdigest())
            sha = cached[1]
        return ObjectInfo(key, int(head["ContentLength"]), sha, head["LastModified"].timestamp())

    async def exists(self, key: str) -> bool:
        return await self._head(key) is not None

    async def list(self, prefix: str = "") -> list[str]:
        full = self.prefix + check_prefix(prefix)
        try:
            return await asyncio.to_thread(self._list, full)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from None

    def _list(self, full: str) -> builtins.list[str]:  # ``list`` here is the method
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        ):
            for item in page.get("Contents", ()):
                key = item["Key"][len(self.prefix) :]
                try:
                    keys.append(check_key(key))
                except InvalidKey:  # put there by another tool under a name we cannot address
                    continue
        return sorted(keys)

    async def delete(self, key: str) -> bool:
        if not await self.exists(key):  # S3 deletes answer the same either way
            return False
        try:
            await asyncio.to_thread(
                self.client.delete_object, Bucket=self.bucket, Key=self._name(key)
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("delete", key, exc) from None
        self._digests.pop(key, None)
        return True


def _credentials(config: S3Config) -> dict[str, str]:
    """Keys from the environment variables the config names; none: boto3's default chain."""
    if config.access_key_env is None or config.secret_key_env is None:
        return {}
    values = {}
    for arg, var in (
        ("aws_access_key_id", config.access_key_env),
        ("aws_secret_access_key", config.secret_key_env),
    ):
        value = os.environ.get(var)
        if not value:
            raise S3Unavailable(f"S3 credentials: the environment variable {var} is not set")
        values[arg] = value
    return values
