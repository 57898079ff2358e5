"""The console's config section (`console:`) and its preview renderer (`agent.console.thumbnails`)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from agent.config import parse_config
from agent.console.thumbnails import SLICE_FRACTIONS, png_gray8, render_slices, window
from agent.data.volume import Volume
from agent.errors import ConfigError


def _cfg(console: dict[str, object], api: dict[str, object] | None = None, base: Path | None = None) -> Any:
    raw = {"site": {"id": "s"}, "console": console, "api": api or {}}
    return parse_config(raw, source=(base / "config.yaml") if base else None, environ={}, check_paths=False)


def test_the_console_is_off_and_on_loopback_unless_configured() -> None:
    cfg = parse_config({"site": {"id": "s"}}, environ={}, check_paths=False)
    assert cfg.console.enabled is False and cfg.console.host == "127.0.0.1"
    assert cfg.console.port != cfg.api.port and cfg.console.tls is None
    env = {"FEDSITE_CONSOLE__ENABLED": "true", "FEDSITE_CONSOLE__PORT": "9001"}
    cfg = parse_config({"site": {"id": "s"}}, environ=env, check_paths=False)
    assert cfg.console.enabled is True and cfg.console.port == 9001


@pytest.mark.parametrize(
    ("console", "api", "key"),
    [
        ({"enabled": True, "port": 8443}, {"port": 8443}, "console.port: 8443 is api.port"),
        ({"enabled": True, "port": 9100}, {"metrics_port": 9100}, "console.port: 9100 is api.metrics_port"),
        (
            {"enabled": True, "tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}},
            {},
            "console.tls.client_ca_file",
        ),
        ({"enabled": True, "port": 0}, {}, "console.port"),
        ({"enabled": True, "login_failures": 0}, {}, "console.login_failures"),
        ({"enabled": True, "login_failures_per_name": 0}, {}, "console.login_failures_per_name"),
        ({"enabled": True, "known_browser_days": -1}, {}, "console.known_browser_days"),
        ({"enabled": True, "known_browser_days": 366}, {}, "console.known_browser_days"),
        ({"enabled": True, "session_minutes": 0}, {}, "console.session_minutes"),
        ({"enabled": "yes please"}, {}, "console.enabled"),
        ({"enabled": True, "listen": "0.0.0.0"}, {}, "console.listen"),
    ],
)
def test_a_bad_console_section_names_its_key(console: dict[str, Any], api: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(console, api)


def test_a_disabled_console_may_name_any_port_and_tls_paths_are_resolved(tmp_path: Path) -> None:
    _cfg({"enabled": False, "port": 8443}, {"port": 8443})
    cfg = _cfg({"enabled": True, "tls": {"cert_file": "tls/c.crt", "key_file": "tls/c.key"}}, base=tmp_path)
    assert cfg.console.tls.cert_file == (tmp_path / "tls" / "c.crt").resolve()
    assert cfg.console.tls.key_file == (tmp_path / "tls" / "c.key").resolve()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body)
        out.append((kind, body))
        at += 12 + length
    return out


def test_the_png_holds_the_pixels_and_nothing_else() -> None:
    image = (np.arange(6 * 5) * 8).astype(np.uint8).reshape(6, 5)
    chunks = _chunks(png_gray8(image))
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour) == (5, 6, 8, 0)
    rows = zlib.decompress(chunks[1][1])
    decoded = np.frombuffer(rows, dtype=np.uint8).reshape(6, 6)
    assert (decoded[:, 0] == 0).all() and (decoded[:, 1:] == image).all()
    with pytest.raises(ValueError):
        png_gray8(image.astype(np.float32))


def test_slices_are_windowed_and_taken_along_the_slice_axis() -> None:
    assert window(np.full((3, 3), np.nan)).max() == 0
    ramp = window(np.linspace(0, 1000, 100).reshape(10, 10))
    assert ramp.min() == 0 and ramp.max() == 255
    array = np.zeros((8, 8, 10), dtype=np.float32)
    for k in range(10):
        array[:, :, k] = k  # each slice its own value, one bright voxel to show orientation
        array[0, 7, k] = 100
    volume = Volume(array=array, affine=np.eye(4), modality="flair", source="nifti", files=[])
    pngs = render_slices(volume)
    assert len(pngs) == len(SLICE_FRACTIONS)
    for png in pngs:
        chunks = _chunks(png)
        width, height = struct.unpack(">II", chunks[0][1][:8])
        assert width == height and width >= 8 * 20  # enlarged by whole pixels
        rows = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(height, width + 1)
        pixels = rows[:, 1:]
        # J upwards: voxel (i=0, j=7) is at the top left.
        assert pixels[0, 0] == 255 and pixels[-1, -1] < 255


def test_serve_refuses_a_port_override_onto_the_consoles_port(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"site": {"id": "s"}, "work_dir": "work", "console": {"enabled": True}}))
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--port", "8444"])
    assert result.exit_code == 2
    assert "console.port: 8444 is the API's port (--port)" in result.output
