"""`pvsfarm vdisk copy`: a second server's copy is recorded only when its digest matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cli.conftest import Invoke


def test_copy_on_another_server_is_verified_and_stale_ones_refused(farm: Invoke, image: Path,
                                                                   tmp_path: Path) -> None:
    assert farm("vdisk", "add", "base", "--file", str(image)).exit_code == 0
    assert farm("server", "add", "n2", "--address", "10.0.0.2").exit_code == 0
    same, stale = tmp_path / "n2-base.img", tmp_path / "stale.img"
    shutil.copyfile(image, same)
    stale.write_bytes(b"\1" * image.stat().st_size)

    refused = farm("vdisk", "copy", "base", "--server", "n2", "--path", str(stale))
    assert refused.exit_code == 1 and "stale or different file" in refused.stderr
    assert farm("vdisk", "copy", "base", "--server", "nope", "--path", str(same)).exit_code == 1

    out = json.loads(farm("vdisk", "copy", "base", "--server", "n2", "--path", str(same), "--json").stdout)
    copies = {c["server"]: c for c in out["copies"]}
    assert copies["n2"]["state"] == "verified" and copies["n2"]["path"] == str(same.resolve())
    again = json.loads(farm("vdisk", "copy", "base", "--server", "n2", "--path", str(same), "--json").stdout)
    assert len(again["copies"]) == len(out["copies"])  # re-verified in place, not duplicated
