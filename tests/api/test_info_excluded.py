"""`/v1/info` counts the subjects a dataset's `exclude_warnings` keeps out of training: a number,
never which subjects, their folders or their warnings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from agent.api.app import create_app
from agent.config import load_config
from agent.service import SiteService
from tests.fixtures.agents import add_tokens, make_site


def _strip_orientation(path: Path) -> None:
    """Rewrite a NIfTI file without qform and sform: its orientation becomes unknown (a geometry warning)."""
    img = nib.load(str(path))
    bare = nib.Nifti1Image(np.asarray(img.dataobj), None)
    bare.header.set_zooms(img.header.get_zooms()[:3])
    nib.save(bare, str(path))


def test_info_counts_excluded_subjects_only(tmp_path: Path) -> None:
    site = make_site(tmp_path / "fed", subjects=4, fmt="nifti", size=32)
    tokens = add_tokens(site.config_path, coordinator="coord")
    cfg = load_config(site.config_path)
    ds = cfg.datasets[0]
    subject = site.patient_ids[1]
    for modality in ds.modalities:
        _strip_orientation(ds.root / ds.images.replace("{subject}", subject).replace("{modality}", modality))
    service = SiteService.open(cfg)
    try:
        service.scan()
        app = create_app(service)

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                return await client.get("/v1/info", headers={"Authorization": f"Bearer {tokens['coord']}"})

        r = asyncio.run(call())
    finally:
        service.db.dispose()
    assert r.status_code == 200, r.text
    [info] = r.json()["datasets"]
    assert info["num_excluded"] == 1
    assert info["num_train"] + info["num_val"] == 3
    text = json.dumps(r.json())
    assert subject not in text and "/" not in text and "geometry" not in text
