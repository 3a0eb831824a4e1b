"""The Ray Serve application over real HTTP (httpx on 127.0.0.1): every endpoint; served top-k equal evaluate's with
and without RAA (the RAA app's export also carries a lexical head, which the ingress applies); bad input gets its
status and message; unsafe images and missing keys are refused; a refresh during a stream of requests fails none; a
refused version keeps the old one serving; a pinned version holds until the user_config releases it; a killed shard
replica fails no request with 2 per shard, and with 1 per shard gets 503 at once until Serve has replaced it."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve

from inference_helpers import evaluated_setup, inference_config
from vixml_ray.config import Config
from vixml_ray.data.dataset import open_dataset
from vixml_ray.eval.evaluate import evaluate, read_predictions
from vixml_ray.index.refresh import refresh_labels
from vixml_ray.index.versions import current_version, set_current
from vixml_ray.model import build_embedder
from vixml_ray.serve.app import application
from vixml_ray.serve.run import start, stop
from vixml_ray.train.lexical import fit_lexical

pytestmark = pytest.mark.slow
KEY_ENV = "VIXML_TEST_SERVE_KEY"
KEY = "s3cret-test-key"
BAD_IMAGE = "data:image/png;base64,!!"  # keeps a missing file's slot masked, as the feature cache does


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def request_queries(dataset: str) -> list[dict]:
    """Every test row as a request query: its text and its image slots as data URIs (missing files: bad URIs)."""
    ds = open_dataset(dataset)
    manifest = sorted((m for m in ds.image_manifest().to_pylist() if m["split"] == "test"),
                      key=lambda m: (m["row"], m["slot"]))
    images: list[list[str]] = [[] for _ in range(ds.num_test)]
    for m in manifest:
        path = ds.image_uri(m["uri"])
        images[m["row"]].append(data_uri(path) if Path(path).exists() else BAD_IMAGE)
    return [{"text": text, "images": slots} for text, slots in zip(ds.texts("test"), images)]


def make_lexical_export(out: Path, cfg: Config, dataset: str) -> str:
    """A random-weight text-only tiny embedder with a lexical head fitted on the dataset's training texts (each
    query's labels and three seeded random labels as its shortlist), published as an inference export."""
    torch.manual_seed(0)
    embedder = build_embedder(cfg, None)
    ds = open_dataset(dataset)
    shortlist = np.random.default_rng(0).integers(0, ds.num_labels, (ds.num_train, 3))
    embedder.lexical = fit_lexical(cfg.model.lexical, ds.texts("train"), ds.label_matrix("train"), shortlist, seed=0)
    embedder.label_catalogue = ds.label_catalogue()
    embedder.save_export(str(out))
    return str(out)


def build(tmp: Path, port: int) -> dict:
    """The data, exports, indexes and evaluations of the two apps (see :func:`served`)."""
    root = tmp / "images"
    root.mkdir()
    (tmp / "outside.png").write_bytes(b"secret")
    (root / "escape.png").symlink_to(tmp / "outside.png")
    common = [f"serve.port={port}", "serve.encoder_num_cpus=0", "serve.poll_interval_s=0.5", "serve.max_k=20",
              "serve.max_queries=30", "serve.max_images=80", "serve.max_body_bytes=400000", "serve.request_timeout_s=20"]
    cfg = inference_config(tmp, *common, f"serve.image_root={root}")
    dataset, export, index = evaluated_setup(tmp, cfg)

    raa_cfg = inference_config(tmp, *common, "model.use_images=false", "infer.raa.enabled=true", "infer.raa.lam=0.5",
                               "infer.raa.neighbors=8", "serve.shard_replicas=2", f"serve.api_key_env={KEY_ENV}",
                               "serve.ingress_max_ongoing_requests=2", "serve.max_queued_requests=1",
                               "model.lexical.enabled=true", "model.lexical.weight=0.5", "model.lexical.candidates=12")
    raa_export = make_lexical_export(tmp / "export-raa", raa_cfg, dataset)
    raa_index = str(tmp / "index-raa")
    refresh_labels(raa_export, dataset, raa_index, raa_cfg)
    evaluate(raa_export, dataset, str(tmp / "eval-raa"), index_dir=raa_index, cfg=raa_cfg)
    return {"tmp": tmp, "cfg": cfg, "raa_cfg": raa_cfg, "dataset": dataset, "export": export, "index": index,
            "raa_export": raa_export, "raa_index": raa_index, "root": root, "queries": request_queries(dataset),
            "auth": {"Authorization": f"Bearer {KEY}"}}


def start_apps(setup: dict) -> httpx.Client:
    os.environ[KEY_ENV] = KEY
    url = start(setup["cfg"], application(setup["export"], setup["index"], setup["cfg"]), name="img",
                route_prefix="/")
    start(setup["raa_cfg"], application(setup["raa_export"], setup["raa_index"], setup["raa_cfg"]), name="raa",
          route_prefix="/raa")
    return httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """Two apps on one Serve: ``/`` a tiny image model (1 replica per shard, images from an image root), ``/raa`` a
    text-only model with RAA, 2 replicas per shard, an API key and a small ingress queue."""
    setup = build(tmp_path_factory.mktemp("serve"), free_port())
    client = start_apps(setup)
    yield {**setup, "client": client}
    client.close()
    stop()
    os.environ.pop(KEY_ENV, None)


def assert_equal_to_evaluation(results: list[dict], eval_dir: Path) -> None:
    rows, ids, scores = read_predictions(str(eval_dir))
    assert len(rows) == len(results)
    for row in rows:
        labels = results[row]["labels"]
        assert [label["row"] for label in labels] == ids[row].tolist()
        np.testing.assert_allclose([label["score"] for label in labels], scores[row], atol=1e-5)


def test_served_top_k_equals_evaluate(served):
    client, cfg = served["client"], served["cfg"]
    response = client.post("/v1/predict", json={"queries": served["queries"], "k": cfg.eval.topk})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "v1"
    assert_equal_to_evaluation(body["results"], served["tmp"] / "eval")
    names = open_dataset(served["dataset"]).texts("label")
    first = body["results"][0]["labels"]
    assert [label["name"] for label in first] == [names[label["row"]] for label in first]
    assert all(label["uid"] for label in first)
    masked = [e for r in body["results"] for e in r["image_errors"] if e is not None]
    assert masked and all(e.startswith("bad data URI") for e in masked)


def test_served_top_k_equals_evaluate_with_raa(served):
    client = served["client"]
    texts = [{"text": q["text"]} for q in served["queries"]]
    response = client.post("/raa/v1/predict", json={"queries": texts, "k": served["raa_cfg"].eval.topk},
                           headers=served["auth"])
    assert response.status_code == 200, response.text
    assert_equal_to_evaluation(response.json()["results"], served["tmp"] / "eval-raa")


def test_health_version_page_and_docs(served):
    client = served["client"]
    health = client.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    version = client.get("/v1/version").json()
    assert version["version"] == current_version(served["index"])
    assert version["num_labels"] == open_dataset(served["dataset"]).num_labels
    assert version["export"]["model"] == "tiny:bert" and len(version["export"]["fingerprint"]) == 64
    assert client.get("/raa/v1/health").status_code == 200  # open without the key
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "<script src" not in page.text
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 422, "JSON"),
    ({"queries": [{"text": 5}]}, 422, '"loc":["body","queries",0,"text"]'),
    ({"queries": [{"text": ""}]}, 422, "needs a non-empty 'text' or at least one image"),
    ({"queries": []}, 422, "queries"),
    ({"queries": [{"text": "x"}], "k": 0}, 422, "k"),
    ({"queries": [{"text": "x"}], "k": 21}, 422, "serve.max_k=20"),
    ({"queries": [{"text": "x"}], "k": "3"}, 422, "k"),
    ({"queries": [{"text": "x", "images": ["a", "b", "c", "d"]}]}, 422, "images"),
    ({"queries": [{"text": "x", "colour": "red"}]}, 422, "colour"),
    ({"queries": [{"text": "x"}] * 31}, 413, "serve.max_queries=30"),
    ({"queries": [{"text": "x", "images": ["data:,"] * 3}] * 27}, 413, "81 images exceed serve.max_images=80"),
    ({"queries": [{"text": "x" * 500_000}]}, 413, "serve.max_body_bytes=400000"),
])
def test_bad_input_gets_its_status_and_message(served, body, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = served["client"].post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.text


def test_unsafe_images_are_refused_and_masked(served):
    client, root = served["client"], served["root"]
    png = next(p for q in served["queries"] for p in q["images"] if p != BAD_IMAGE)
    (root / "inside.png").write_bytes(base64.b64decode(png.split(",", 1)[1]))
    (root / "sub").mkdir(exist_ok=True)
    images = ["inside.png", "sub/../../outside.png", "escape.png"]
    private = [f"http://127.0.0.1:{served['cfg'].serve.port}/", "http://169.254.169.254/latest/meta-data"]
    response = client.post("/v1/predict", json={"queries": [{"text": "red", "images": images},
                                                            {"text": "red", "images": private},
                                                            {"text": "red", "images": [png]}], "k": 3})
    assert response.status_code == 200, response.text
    errors = [r["image_errors"] for r in response.json()["results"]]
    assert errors[0][0] is None and errors[2] == [None]
    assert errors[0][1] == errors[0][2] == "refused: outside serve.image_root"
    assert all(e.startswith("refused: ") and "private" in e for e in errors[1])
    inside, _, direct = response.json()["results"]
    assert inside["labels"] == direct["labels"]  # the file in the root is the same image as the data URI


def test_images_sent_to_a_text_only_model_are_ignored_with_a_reason(served):
    response = served["client"].post("/raa/v1/predict", headers=served["auth"], json={
        "queries": [{"text": "red", "images": ["data:image/png;base64,!!", "http://127.0.0.1/x.png"]}], "k": 3})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["image_errors"] == ["ignored: the model reads text only"] * 2


def test_api_key_is_required_and_compared(served):
    client = served["client"]
    body = {"queries": [{"text": "red"}], "k": 3}
    assert client.post("/raa/v1/predict", json=body).status_code == 401
    wrong = client.post("/raa/v1/predict", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert client.get("/raa/v1/version").status_code == 401
    assert client.get("/raa/v1/version", headers=served["auth"]).status_code == 200
    assert client.post("/raa/v1/predict", json=body, headers=served["auth"]).status_code == 200


def test_overload_beyond_the_queue_gets_503_at_once(served):
    body = {"queries": [{"text": q["text"]} for q in served["queries"]], "k": 20}
    results: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(base_url=str(served["client"].base_url), timeout=60) as c:
            results.append(c.post("/raa/v1/predict", json=body, headers=served["auth"]))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes


class Stream:
    """Requests in a loop from a thread until stopped; records every status and answering version (or error text),
    and how long each took."""

    def __init__(self, url: str, path: str, body: dict, headers: dict | None = None):
        self.answers: list[tuple[int, str | None]] = []
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, path, body, headers or {}), daemon=True)

    def _run(self, url: str, path: str, body: dict, headers: dict) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                response = client.post(path, json=body, headers=headers)
                self.seconds.append(time.monotonic() - start)
                self.answers.append((response.status_code, response.json().get("version")
                                     if response.status_code == 200 else response.text))

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(predicate, timeout_s: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)


def replica_actors(app: str, deployment: str) -> list[ray.actor.ActorHandle]:
    """The live replica actors of ``deployment`` of ``app``."""
    return [ray.get_actor(actor["name"], namespace=actor["namespace"])
            for actor in ray.util.list_named_actors(all_namespaces=True) if f"{app}#{deployment}#" in actor["name"]]


def test_refresh_during_requests_fails_none_and_a_foreign_version_is_refused(served):
    client, index = served["client"], served["index"]
    url = str(client.base_url)
    body = {"queries": served["queries"][:4], "k": 5}
    old = client.get("/v1/version").json()["version"]
    with Stream(url, "/v1/predict", body) as stream:
        refresh_labels(served["export"], served["dataset"], index, incremental=True)
        new = current_version(index)
        wait_for(lambda: any(version == new for _, version in stream.answers[-3:]))
        time.sleep(1.0)
    assert stream.answers and all(status == 200 for status, _ in stream.answers), stream.answers
    versions = [version for _, version in stream.answers]
    assert versions[0] == old and versions[-1] == new != old
    assert versions == sorted(versions, key=lambda v: int(v[1:]))  # switched once, never back

    # a version embedded by another export is refused: the old one keeps serving, /v1/version shows why
    refresh_labels(served["raa_export"], served["dataset"], index, served["raa_cfg"])
    foreign = current_version(index)
    wait_for(lambda: any(r["version"] == foreign for r in client.get("/v1/version").json()["refused"]))
    refused = next(r for r in client.get("/v1/version").json()["refused"] if r["version"] == foreign)
    assert "fingerprints differ" in refused["reason"]
    answer = client.post("/v1/predict", json=body)
    assert answer.status_code == 200 and answer.json()["version"] == new
    set_current(index, new)


def test_pinned_version_holds_until_the_user_config_releases_it(served):
    """An app deployed with ``version=old`` (the ingress's user_config) serves ``old`` over several polls of a newer
    CURRENT; reconfigured with ``{"version": null}`` (what Serve does on the live replica when a ``serve deploy``
    changes only the user_config) it follows CURRENT, failing no request."""
    client, index, cfg = served["client"], served["index"], served["cfg"]
    if current_version(index) == "v1":
        refresh_labels(served["export"], served["dataset"], index, incremental=True)
    old, new = "v1", current_version(index)
    start(cfg, application(served["export"], index, cfg, version=old), name="pinned", route_prefix="/pinned")
    try:
        info = client.get("/pinned/v1/version").json()
        assert (info["version"], info["pinned"]) == (old, old), info
        body = {"queries": [{"text": q["text"]} for q in served["queries"][:3]], "k": 5}
        with Stream(str(client.base_url), "/pinned/v1/predict", body) as stream:
            since = time.monotonic()
            wait_for(lambda: len(stream.answers) >= 3 and time.monotonic() - since > 3 * cfg.serve.poll_interval_s,
                     what="three polls of CURRENT")
            assert {version for _, version in stream.answers} == {old}, stream.answers
            for shard in ("shard-0", "shard-1"):  # loaded the pinned version only: never switched to CURRENT
                assert serve.get_deployment_handle(shard, "pinned").versions.remote().result(timeout_s=60) == [old]
            serve.get_deployment_handle("ingress", "pinned").reconfigure.remote({"version": None}).result(
                timeout_s=60)
            wait_for(lambda: any(version == new for _, version in stream.answers[-3:]), what=f"answers by {new}")
        assert all(status == 200 for status, _ in stream.answers), stream.answers
        versions = [version for _, version in stream.answers]
        assert versions[0] == old and versions[-1] == new
        assert versions == sorted(versions, key=lambda v: int(v[1:]))  # switched once, never back
        info = client.get("/pinned/v1/version").json()
        assert (info["version"], info["pinned"]) == (new, None), info
    finally:
        serve.delete("pinned")


def test_killed_shard_replica_fails_no_request(served):
    body = {"queries": [{"text": q["text"]} for q in served["queries"][:3]], "k": 5}
    replicas = replica_actors("raa", "shard-0")
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    with Stream(str(served["client"].base_url), "/raa/v1/predict", body, served["auth"]) as stream:
        wait_for(lambda: len(stream.answers) >= 3)
        ray.kill(victim, no_restart=True)
        seen = len(stream.answers)
        wait_for(lambda: len(stream.answers) >= seen + 10)
    assert all(status == 200 for status, _ in stream.answers), stream.answers


def test_killed_only_shard_replica_gets_503_at_once_until_replaced(served):
    """The image app has 1 replica per shard: while Serve replaces a killed one, requests get 503 within seconds (none
    waits for the restart, none gets 500), then 200 again."""
    body = {"queries": [{"text": q["text"]} for q in served["queries"][:3]], "k": 5}
    replicas = replica_actors("img", "shard-0")
    assert len(replicas) == 1, replicas
    with Stream(str(served["client"].base_url), "/v1/predict", body) as stream:
        wait_for(lambda: len(stream.answers) >= 3, what="the first answers")
        ray.kill(replicas[0], no_restart=True)
        killed = len(stream.answers)

        def replaced() -> bool:
            codes = [status for status, _ in stream.answers[killed:]]
            return 503 in codes and 200 in codes[codes.index(503):]

        wait_for(replaced, what="a 503 while shard-0 is replaced, then a 200")
    assert {status for status, _ in stream.answers} == {200, 503}, stream.answers
    assert all("temporarily unavailable" in text for status, text in stream.answers if status == 503), stream.answers
    slowest = max(stream.seconds)
    assert slowest < 5.0, f"a request took {slowest:.1f} s (waited for the restart?): {stream.answers}"


def chromium() -> tuple[str, str] | None:
    """Debian's chromium and chromium-driver (installed by .ci/run), or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(chromium() is None, reason="needs Chromium and its driver: apt-get install chromium "
                                               "chromium-driver (.ci/run does)")
def test_page_in_a_headless_browser(served, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    png = next(p for q in served["queries"] for p in q["images"] if p != BAD_IMAGE)
    image = tmp_path / "query.png"
    image.write_bytes(base64.b64decode(png.split(",", 1)[1]))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(str(served["client"].base_url) + "/")
        driver.find_element(By.ID, "text").send_keys("red square")
        driver.find_element(By.ID, "images").send_keys(str(image))
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("4")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(expected_conditions.visibility_of_element_located((By.ID, "results")))
        names = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#results tr.label td.name")]
        status = driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    expected = served["client"].post("/v1/predict", json={"queries": [{"text": "red square", "images": [png]}],
                                                          "k": 4}).json()
    assert names == [label["name"] for label in expected["results"][0]["labels"]]
    assert f"index version {expected['version']}" in status
