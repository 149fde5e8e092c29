"""Serving: `unilip serve` (real Ray Serve on 127.0.0.1) with a tiny model converted from a
release checkpoint (`unilip convert official`), through the
official `openai` client and raw HTTP: generations, edits, chat, reconstructions, bad
input, auth and concurrent load."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serve.app import ServeProcess
from tests.conftest import run_cli
from tests.release_fixture import perturbed_tiny, write_release

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(stack, s3, tmp_path_factory):
    # the model served: a release checkpoint converted by `unilip convert official`
    # (tests/test_official.py), in the bucket; the replica downloads it after a key rotation
    root = tmp_path_factory.mktemp("serve")
    release = write_release(perturbed_tiny(), root / "UniLIP-tiny")
    converted = run_cli("convert", "official", "--src", str(release), "--out", str(root / "unilip-tiny"))
    assert converted.returncode == 0, converted.stderr[-3000:]
    model = f"s3://{stack.bucket}/serve/unilip-tiny"
    for f in sorted((root / "unilip-tiny").rglob("*")):
        if f.is_file():
            s3.put_bytes(f"{model}/{f.relative_to(root / 'unilip-tiny')}", f.read_bytes())
    start = stack.credential_rotations()
    while stack.credential_rotations() == start:  # the keys of the upload are not the replica's
        time.sleep(1)
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc = ServeProcess(model, "--api-key-env", "UNILIP_TEST_KEY", env={"UNILIP_TEST_KEY": KEY}, log=log)
    with proc:
        yield proc.url
    assert proc.returncode == 0, log.read_text()[-4000:]  # Ctrl-C: the command shuts Serve down and exits


def auth(headers: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {KEY}", **(headers or {})}


def png_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_generates_edits_and_chats(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    gen = client.images.generate(
        model="unilip",
        prompt="a red fox in the snow",
        n=2,
        size="448x448",
        response_format="b64_json",
        extra_body={"seed": 1, "num_inference_steps": 2},
    )
    assert [decode(d.b64_json).size for d in gen.data] == [(448, 448)] * 2
    again = client.images.generate(
        model="unilip",
        prompt="a red fox in the snow",
        n=1,
        response_format="b64_json",
        extra_body={"seed": 1, "num_inference_steps": 2},
    )
    # A seed fixes the image whatever else is in the batch (up to float rounding of batched kernels).
    diff = np.abs(np.asarray(decode(again.data[0].b64_json), float) - np.asarray(decode(gen.data[0].b64_json), float))
    other = np.abs(np.asarray(decode(gen.data[1].b64_json), float) - np.asarray(decode(gen.data[0].b64_json), float))
    assert diff.mean() < 0.5 and other.mean() > 5 * max(diff.mean(), 0.1), (diff.mean(), other.mean())
    edit = client.images.edit(
        model="unilip",
        image=("in.png", png_bytes(), "image/png"),
        prompt="make it blue",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    assert decode(edit.data[0].b64_json).size == (448, 448)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    chat = client.chat.completions.create(
        model="unilip",
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in the image?"},
                    {"type": "image_url", "image_url": {"url": uri}},
                ],
            }
        ],
    )
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    recon = requests.post(f"{server}/v1/reconstructions", json={"image": uri}, headers=auth(), timeout=60)
    assert recon.status_code == 200 and decode(recon.json()["data"][0]["b64_json"]).size == (448, 448)
    assert [m.id for m in client.models.list().data] == ["unilip-tiny"]


def test_auth(server):
    assert requests.get(f"{server}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.get(f"{server}/v1/models", headers=auth(), timeout=10).status_code == 200
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200  # health stays open


def malformed_requests(big: int) -> list[tuple[str, dict]]:
    """(path, requests.post kwargs) for every kind of bad input, with variations."""
    good_b64 = base64.b64encode(png_bytes()).decode()
    gen, recon, chat, edit = "/v1/images/generations", "/v1/reconstructions", "/v1/chat/completions", "/v1/images/edits"
    cases = []
    for body in ["{", "{bad json}", "[1, 2", "\xff\xfe", "", "null", "[]", '"text"', "12"]:
        for path in (gen, recon, chat):
            cases.append((path, {"data": body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body}))
    for extra in [
        {},
        {"prompt": None},
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": 5},
        {"prompt": ["a"]},
        {"prompt": "x" * 5000},
        {"prompt": "a <img> b"},
    ]:
        cases.append((gen, {"json": {**{"n": 1}, **extra}}))
    for k, bad in [
        ("n", 0),
        ("n", 5),
        ("n", -1),
        ("n", 2.5),
        ("n", "two"),
        ("n", True),
        ("size", "512x512"),
        ("size", "1024x1024"),
        ("size", 448),
        ("response_format", "url"),
        ("guidance_scale", float("nan")),
        ("guidance_scale", float("inf")),
        ("guidance_scale", -1),
        ("guidance_scale", 1000),
        ("guidance_scale", "high"),
        ("num_inference_steps", 0),
        ("num_inference_steps", 100000),
        ("num_inference_steps", 1.5),
        ("num_inference_steps", "NaN"),
        ("seed", -5),
        ("seed", 2**40),
        ("seed", "abc"),
    ]:
        payload = json.dumps({"prompt": "a fox", k: bad}, allow_nan=True)
        cases.append((gen, {"data": payload}))
    for image in [
        None,
        "",
        7,
        "not base64 !!",
        "data:image/png,abc",
        "data:image/png;base64,%%%",
        base64.b64encode(b"not an image at all").decode(),
        base64.b64encode(png_bytes()[:40]).decode(),
        base64.b64encode(png_bytes((8, 8))).decode(),
        "http://example.com/a.png",
        "A" * (big + 10),
    ]:
        cases.append((recon, {"json": {"image": image}}))
        part = {"type": "image_url", "image_url": {"url": image}}
        cases.append(
            (chat, {"json": {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}]}})
        )
    for messages in [
        None,
        [],
        "hi",
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "no image"}],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "two images"}]
                + [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + good_b64}}] * 2,
            }
        ],
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + good_b64}}],
            }
        ],
        [{"role": "user", "content": [{"type": "audio"}]}],
    ]:
        cases.append((chat, {"json": {"messages": messages}}))
    cases.append(
        (
            chat,
            {
                "json": {
                    "max_tokens": 0,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "q"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + good_b64}},
                            ],
                        }
                    ],
                }
            },
        )
    )
    for files, form in [
        ({}, {"prompt": "blue"}),
        ({"image": ("a.txt", b"hello", "text/plain")}, {"prompt": "blue"}),
        ({"image": ("a.png", png_bytes(), "image/png")}, {}),
        ({"image": ("a.png", png_bytes(), "image/png")}, {"prompt": ""}),
        ({"image": ("a.png", png_bytes(), "image/png")}, {"prompt": "blue", "n": "many"}),
        ({"image": ("a.png", png_bytes(), "image/png")}, {"prompt": "blue", "size": "64x64"}),
    ]:
        cases.append((edit, {"files": files, "data": form}))
    cases.append((edit, {"json": {"prompt": "not multipart"}}))
    cases.append((gen, {"data": b"x" * (big + 1)}))  # over the body cap
    return cases


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    cases = malformed_requests(big=20 * 2**20)
    cases = cases * (200 // len(cases) + 1)
    assert len(cases) >= 200
    statuses = []
    for path, kwargs in cases:
        r = requests.post(f"{server}{path}", headers=auth(), timeout=120, **kwargs)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (
            path,
            kwargs.get("json") or str(kwargs.get("data"))[:200],
            r.status_code,
            r.text[:300],
        )
        assert r.json()["error"]["message"], r.text
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    ok = requests.post(
        f"{server}/v1/images/generations",
        headers=auth(),
        json={"prompt": "a fox", "num_inference_steps": 1},
        timeout=120,
    )
    assert ok.status_code == 200
    print(
        f"\n{len(statuses)} malformed requests: status counts { ({s: statuses.count(s) for s in sorted(set(statuses))}) }"
    )


def test_concurrent_load(server):
    def client(i: int) -> list[float]:
        times = []
        with requests.Session() as s:
            for j in range(8):
                t0 = time.perf_counter()
                r = s.post(
                    f"{server}/v1/images/generations",
                    headers=auth(),
                    timeout=300,
                    json={"prompt": f"a fox number {i}-{j}", "num_inference_steps": 1, "seed": j},
                )
                assert r.status_code == 200, r.text[:300]
                assert len(r.json()["data"]) == 1
                times.append(time.perf_counter() - t0)
        return times

    with ThreadPoolExecutor(8) as pool:
        times = sorted(t for ts in pool.map(client, range(8)) for t in ts)
    assert len(times) == 64  # latency under load is measured by `unilip bench serve` (BENCHMARKS.md)
    p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
    print(f"\nload 8 clients x 8 requests: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")


def test_overload_gets_503_with_retry_after_not_a_hang(server):
    # serve.yaml: the model replica takes 8 ongoing + 32 queued requests; 80 at once overflow it.
    def one(i: int) -> tuple[int, str | None]:
        r = requests.post(
            f"{server}/v1/images/generations",
            headers=auth(),
            timeout=600,
            json={"prompt": f"fox {i}", "num_inference_steps": 8, "seed": i},
        )
        return r.status_code, r.headers.get("Retry-After")

    with ThreadPoolExecutor(80) as pool:
        results = list(pool.map(one, range(80)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) >= 8, statuses
    assert all(retry == "1" for s, retry in results if s == 503)
    ready = requests.get(f"{server}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["dtype"] == "float32"  # dtype auto: fp32 on a CPU replica
    assert ready.json()["dit_pos_embed"] == "sincos"  # the replica's DiT adds the embedding the release trained with
