import pytest

from unilip.config import S3Config
from unilip.errors import UserError
from unilip.s3 import S3Error, s3_access, split_s3


def test_boto3_round_trip(s3, stack):
    uri = f"s3://{stack.bucket}/roundtrip/boto3.bin"
    payload = bytes(range(256)) * 100
    s3.put_bytes(uri, payload)
    assert s3.get_bytes(uri) == payload
    assert uri in s3.list_keys(f"s3://{stack.bucket}/roundtrip/")
    # the client really talks to the local server, not to AWS
    assert s3.client.meta.endpoint_url == stack.env()["AWS_ENDPOINT_URL_S3"]


def test_pyarrow_round_trip_both_ways(s3, stack):
    fs, path = s3.resolve(f"s3://{stack.bucket}/roundtrip/arrow.bin")
    assert path == f"{stack.bucket}/roundtrip/arrow.bin"
    with fs.open_output_stream(path) as f:
        f.write(b"written by pyarrow")
    assert s3.get_bytes(f"s3://{path}") == b"written by pyarrow"
    s3.put_bytes(f"s3://{stack.bucket}/roundtrip/from-boto3.txt", b"written by boto3")
    with fs.open_input_stream(f"{stack.bucket}/roundtrip/from-boto3.txt") as f:
        assert f.read() == b"written by boto3"
    info = fs.get_file_info(path)
    assert info.size == len(b"written by pyarrow")


def test_errors_name_bucket_key_and_cause(s3, stack):
    with pytest.raises(S3Error) as e:
        s3.get_bytes(f"s3://{stack.bucket}/no/such/key.txt")
    assert f"s3://{stack.bucket}/no/such/key.txt" in str(e.value) and "NoSuchKey" in str(e.value)
    with pytest.raises(S3Error) as e:
        s3.put_bytes("s3://no-such-bucket-here/k", b"x")
    assert "s3://no-such-bucket-here/k" in str(e.value) and "NoSuchBucket" in str(e.value)
    with pytest.raises(UserError, match="not an s3:// URI"):
        split_s3("/local/path")


def test_one_factory_resolves_endpoint_region_and_credentials(monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    aws = s3_access()
    assert aws.endpoint_url is None  # no endpoint anywhere: real AWS S3
    assert aws.client.meta.endpoint_url.startswith("https://s3.")
    assert aws.access_key == "AKIDEXAMPLE" and aws.region == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env_cfg = s3_access()
    assert env_cfg.endpoint_url == "http://127.0.0.1:9" and env_cfg.region == "eu-west-1"
    explicit = s3_access(S3Config(endpoint_url="http://127.0.0.1:10", region="us-west-2"))
    assert explicit.endpoint_url == "http://127.0.0.1:10" and explicit.region == "us-west-2"
    assert explicit.env()["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:10"
    assert explicit.filesystem.region == "us-west-2"
