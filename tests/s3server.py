"""A real S3-protocol server for tests and benchmarks: moto's ``ThreadedMotoServer`` on a free
loopback port, with the AWS environment pointed at it (s3fs / boto3 / pyarrow read it)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def clear_s3fs_cache() -> None:
    """Forget cached s3fs instances (and their listings) so a new endpoint / state is seen."""
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass


@contextmanager
def moto_s3(bucket: str = "bootdiff-test") -> Iterator[Tuple[str, str]]:
    """Start moto's S3 server, set the AWS env, create ``bucket``; yield (``s3://bucket``,
    endpoint URL); stop the server and restore the environment afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved: Dict[str, str | None] = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    clear_s3fs_cache()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}", endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_s3fs_cache()
