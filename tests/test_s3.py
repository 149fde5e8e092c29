import pickle
import subprocess
import time

import boto3
import pytest
from pyarrow import fs as pafs

from cluster.local import LocalStack, patched_environ
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
    # keys the user set explicitly are the chain's first link, read by the client itself
    assert aws.client._get_credentials().access_key == "AKIDEXAMPLE" and aws.region == "us-east-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env_cfg = s3_access()
    assert env_cfg.endpoint_url == "http://127.0.0.1:9" and env_cfg.region == "eu-west-1"
    explicit = s3_access(S3Config(endpoint_url="http://127.0.0.1:10", region="us-west-2"))
    assert explicit.endpoint_url == "http://127.0.0.1:10" and explicit.region == "us-west-2"
    assert explicit.env()["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:10"
    assert explicit.filesystem.region == "us-west-2"


def test_no_credential_is_frozen_copied_or_shipped(stack, s3):
    # the session's stack hands out rotating keys: nothing of them may end up in what the
    # project builds, pickles for Ray tasks, or exports to child processes
    current = boto3.Session().get_credentials().get_frozen_credentials()
    assert current.access_key and stack.credential_rotations() >= 1
    for shipped in (pickle.dumps(s3), repr(s3.env()).encode()):
        assert current.access_key.encode() not in shipped and current.secret_key.encode() not in shipped
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(s3.env())
    tracked = subprocess.run(
        ["git", "grep", "-l", "get_frozen_credentials", "--", "*.py"], capture_output=True, text=True
    )
    assert tracked.stdout.split() == ["tests/test_s3.py"]  # this test's own calls only


@pytest.mark.stack  # a stack of its own: S3 and the credentials endpoint
def test_rotated_keys_kill_frozen_copies_while_the_chain_refreshes(tmp_path):
    """What the old code did (keys frozen from the chain, passed explicitly) fails once the
    key it froze is revoked; the project's clients, boto3 and pyarrow alike, carry on."""
    st = LocalStack(tmp_path / "stack", bucket="rotation", credentials="rotating", rotation_s=2, log=lambda m: None)
    try:
        st.up(("s3", "credentials"))
        st.activate()
        s3 = st.s3()
        s3.put_bytes("s3://rotation/k", b"payload")
        frozen = boto3.Session().get_credentials().get_frozen_credentials()
        endpoint = st.env()["AWS_ENDPOINT_URL_S3"]
        old_boto3 = boto3.Session().client(
            "s3", endpoint_url=endpoint, aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key
        )
        old_arrow = pafs.S3FileSystem(
            endpoint_override=endpoint.split("//")[1],
            scheme="http",
            access_key=frozen.access_key,
            secret_key=frozen.secret_key,
        )
        assert old_boto3.get_object(Bucket="rotation", Key="k")["Body"].read() == b"payload"
        start = st.credential_rotations()
        while st.credential_rotations() < start + 3:  # a key lives two periods: the frozen one is gone
            assert s3.get_bytes("s3://rotation/k") == b"payload"
            assert s3.filesystem.open_input_file("rotation/k").read() == b"payload"
            time.sleep(0.5)
        with pytest.raises(Exception, match="InvalidAccessKeyId"):
            old_boto3.get_object(Bucket="rotation", Key="k")
        with pytest.raises(OSError, match="ACCESS_DENIED|INVALID_ACCESS_KEY_ID"):
            old_arrow.open_input_file("rotation/k").read()
        # a client built afterwards, anywhere (a Ray task, a Serve replica), resolves its own
        with patched_environ(st.env()):
            assert pickle.loads(pickle.dumps(s3)).get_bytes("s3://rotation/k") == b"payload"
    finally:
        st.deactivate()
        st.down()
