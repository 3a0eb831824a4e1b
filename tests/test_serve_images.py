"""A request's images are read safely (vixml_ray.serve.images): bounded data URIs, no private-address URLs, paths
only inside the image root (no '..', no symlink escape), for local and URI roots; the config guards the batch size."""

from __future__ import annotations

import base64

import pytest

from vixml_ray.config import ServeConfig, load_config
from vixml_ray.errors import ConfigError
from vixml_ray.serve.app import build
from vixml_ray.serve.images import ImageRefused, check_url_host, read_image


def reason(spec: str, cfg: ServeConfig) -> str:
    with pytest.raises(ImageRefused) as err:
        read_image(spec, cfg)
    return err.value.reason


def test_data_uris_are_decoded_and_bounded():
    cfg = ServeConfig(max_image_bytes=10)
    assert read_image("data:image/png;base64," + base64.b64encode(b"0123456789").decode(), cfg) == b"0123456789"
    assert reason("data:image/png;base64," + base64.b64encode(b"x" * 11).decode(), cfg) == "too large: over 10 bytes"
    assert reason("data:image/png;base64,!!", cfg) == "bad data URI: invalid base64"
    assert reason("data:image/png,rawbytes", cfg).startswith("bad data URI: expected")


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://localhost:8000/", "http://10.1.2.3/x",
                                 "http://192.168.0.1/x", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x"])
def test_private_addresses_are_refused_unless_allowed(url):
    with pytest.raises(ImageRefused, match="private, loopback or link-local"):
        check_url_host(url, allow_private=False)
    check_url_host(url, allow_private=True)
    assert reason(url, ServeConfig()).startswith("refused: ")


def test_paths_need_an_image_root_and_stay_inside_it(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.png").write_bytes(b"outside")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dir-link").symlink_to(tmp_path)
    assert reason("sub/a.png", ServeConfig()) == "refused: local paths and storage URIs need serve.image_root"
    cfg = ServeConfig(image_root=str(root))
    assert read_image("sub/a.png", cfg) == read_image(str(root / "sub" / "a.png"), cfg) == b"inside"
    assert read_image(f"file://{root}/sub/a.png", cfg) == b"inside"
    for escape in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "link.png",
                   "dir-link/secret.png", f"file://{tmp_path}/secret.png"):
        assert reason(escape, cfg) == "refused: outside serve.image_root", escape
    assert reason("s3://bucket/a.png", cfg) == "refused: not under serve.image_root"
    assert reason("sub/none.png", cfg) == "missing"
    assert reason("sub/a.png", ServeConfig(image_root=str(root), max_image_bytes=3)) == "too large: over 3 bytes"


def test_uri_roots_refuse_dot_dot_and_other_prefixes(tmp_path):
    root = f"file://{tmp_path}/root"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.png").write_bytes(b"ok")
    cfg = ServeConfig(image_root="mock://bucket/images")
    assert reason("mock://bucket/images/../secret.png", cfg) == "refused: '..' in an image path"
    assert reason("../secret.png", cfg) == "refused: '..' in an image path"
    assert reason("mock://bucket/other/a.png", cfg) == "refused: not under serve.image_root"
    assert read_image("a.png", ServeConfig(image_root=root)) == b"ok"


def test_batches_cannot_exceed_the_encoders_ongoing_requests():
    with pytest.raises(ConfigError, match="encoder_max_ongoing_requests"):
        load_config(None, ["serve.max_batch_size=64", "serve.encoder_max_ongoing_requests=32"])


def test_builder_needs_checkpoint_and_index():
    with pytest.raises(ConfigError, match=r"\['checkpoint'\]"):
        build({"index": "/some/index"})
