"""Once per fleet: who compiles or downloads, who gets the controller's copy, how it is checked."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import FileDownloadCommand, FileUploadCommand, FunctionCommand, StringCommand

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import ModelFile, parse_host_config
from gemma4_fleet.facts import LlamaCppBuildInfo, ModelFileStamp
from gemma4_fleet.fleet_share import (
    CONTROLLER_CACHE,
    ShareHost,
    ShareRole,
    artifact_path,
    artifact_problem,
    builder_problems,
    plan_sharing,
    share_key,
    store_artifact,
)
from gemma4_fleet.host_scripts.prune import MARKER
from gemma4_fleet.render import PLACE_MODEL_SCRIPT, UNPACK_BUILD_SCRIPT
from tests.unit.test_config import host_data
from tests.unit.test_operations import (
    RecordedHost,
    fact,
    run_here,
    run_op,
    script_words,
    shipped_words,
)

pytestmark = pytest.mark.unit
COMPILE = ShareRole(make=True, publish=True)


def roles(hosts: list[ShareHost], cached: set[str] | None = None) -> dict[str, ShareRole]:
    return plan_sharing(hosts, cached or set())


def test_first_host_of_a_build_id_compiles_and_the_rest_install_its_artifact() -> None:
    got = roles([ShareHost("a", "id1", False), ShareHost("b", "id1", False)])
    assert got == {
        "a": ShareRole(make=True, publish=True, source="a"),
        "b": ShareRole(install=True, source="a"),
    }


def test_a_marked_host_compiles_and_each_build_id_has_its_own_builder() -> None:
    got = roles(
        [
            ShareHost("a", "sm89", False),
            ShareHost("b", "sm89", False, marked=True),
            ShareHost("c", "sm86", False),
            ShareHost("d", "sm86", False),
        ]
    )
    assert [n for n, r in got.items() if r.make] == ["b", "c"]
    assert got["a"] == ShareRole(install=True, source="b")
    assert got["d"] == ShareRole(install=True, source="c")


def test_nobody_compiles_what_the_cache_or_a_host_already_has() -> None:
    cached = roles([ShareHost("a", "id1", False), ShareHost("b", "id1", False)], {"id1"})
    assert cached == {
        "a": ShareRole(install=True, source=CONTROLLER_CACHE),
        "b": ShareRole(install=True, source=CONTROLLER_CACHE),
    }
    # the marked host lacks the build but another has it: that copy is packed, no compile
    held = roles([ShareHost("a", "id1", True), ShareHost("b", "id1", False, marked=True)])
    assert held == {
        "a": ShareRole(publish=True, source="a", installed=True),
        "b": ShareRole(install=True, source="a"),
    }
    # everybody has it: nothing to do, nothing packed (a no-op stays a no-op)
    done = roles([ShareHost("a", "id1", True), ShareHost("b", "id1", True)])
    assert not any(r.make or r.publish or r.install for r in done.values())


def test_two_marked_builders_of_one_build_and_release_are_refused_naming_the_host() -> None:
    one_per_release = [
        ShareHost("a", "0c1e57098bba-1f2e3d4c-debian12", False, marked=True),
        ShareHost("c", "0c1e57098bba-1f2e3d4c-debian13", False, marked=True),
        ShareHost("d", "0c1e57098bba-1f2e3d4c-debian13", False),
    ]
    assert builder_problems(one_per_release) == []
    twice = [*one_per_release, ShareHost("b", "0c1e57098bba-1f2e3d4c-debian12", True, marked=True)]
    assert builder_problems(twice) == [
        "host b: llama_builder: host a is already the builder of build "
        "0c1e57098bba-1f2e3d4c-debian12; mark one host per build id and release"
    ]


def test_llama_builder_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match="host a: llama_builder: Input should be a valid boolean"):
        parse_host_config("a", host_data(llama_builder="yes"))


def test_an_artifact_is_kept_only_with_its_checksum_and_rejected_when_corrupt(
    tmp_path: Path,
) -> None:
    artifact = artifact_path("0c1e57098bba-1f2e3d4c", tmp_path)
    assert artifact == tmp_path / "builds" / "0c1e57098bba-1f2e3d4c.tar.gz"
    assert "is not in the controller cache" in str(artifact_problem(artifact))
    received = tmp_path / "in.partial"
    received.write_bytes(b"bytes that got mangled")
    problem = store_artifact(received, hashlib.sha256(b"bytes as packed").hexdigest(), artifact)
    assert problem is not None and "arrived with sha256" in problem
    assert not artifact.exists() and not received.exists()

    received.write_bytes(b"bytes as packed")
    want = hashlib.sha256(b"bytes as packed").hexdigest()
    assert store_artifact(received, want, artifact) is None
    assert artifact.read_bytes() == b"bytes as packed"
    assert Path(f"{artifact}.sha256").read_text() == f"{want}  {artifact.name}\n"
    assert artifact_problem(artifact) is None

    artifact.write_bytes(b"bytes as tampered")
    problem = artifact_problem(artifact)
    assert problem is not None and f"says {want}; rejected" in problem


@pytest.fixture
def config() -> Any:
    config = parse_host_config("box1", host_data(llamacpp_build={"cuda_architectures": [89]}))
    build = config.build.model_copy(update={"install_root": "/opt/l l; $(id)"})
    return config.model_copy(update={"build": build})


def test_only_the_publishing_host_packs_and_only_installing_hosts_place(
    config: Any, tmp_path: Path
) -> None:
    artifact = str(tmp_path / "builds" / f"{config.build_id}.tar.gz")
    host = RecordedHost(fact(LlamaCppBuildInfo, None, build_dir=config.build_dir))
    install = ShareRole(install=True, source="box0")
    assert run_op(g4f.build, host, config=config, role=install) == []
    assert host.noops == [f"llama.cpp build {config.build_id}: not compiled here (from box0)"]
    assert run_op(g4f.publish_build, host, config=config, role=install, artifact=artifact) == []
    assert run_op(g4f.install_build, host, config=config, role=COMPILE, artifact=artifact) == []

    pack, mkdir, sha, tar, store, clean = run_op(
        g4f.publish_build, host, config=config, role=COMPILE, artifact=artifact
    )
    packed = f"/opt/l l; $(id)/build/{config.build_id}.tar.gz"
    assert script_words(pack)[1] == ["/opt/l l; $(id)", config.build_id, packed]
    assert isinstance(mkdir, FunctionCommand) and isinstance(store, FunctionCommand)
    assert isinstance(sha, FileDownloadCommand) and isinstance(tar, FileDownloadCommand)
    assert (tar.src, tar.dest) == (packed, f"{artifact}.box1.partial")
    assert isinstance(clean, StringCommand)

    check, _mkdir, up_tar, up_sha, unpack = run_op(
        g4f.install_build, host, config=config, role=install, artifact=artifact
    )
    assert isinstance(check, FunctionCommand)
    assert check.args == (
        artifact,
        f"llama.cpp build {config.build_id}",
        "box0",
        "the build it has keeps serving",
    )
    assert isinstance(up_tar, FileUploadCommand) and isinstance(up_sha, FileUploadCommand)
    assert (up_tar.src, up_tar.dest) == (artifact, packed)
    assert (up_sha.src, up_sha.dest) == (f"{artifact}.sha256", f"{packed}.sha256")
    assert shipped_words(unpack) == (
        UNPACK_BUILD_SCRIPT, ["/opt/l l; $(id)", config.build_id, packed, MARKER]
    )  # fmt: skip

    installed = RecordedHost(fact(LlamaCppBuildInfo, {"id": "x"}, build_dir=config.build_dir))
    assert run_op(g4f.install_build, installed, config=config, role=install, artifact="a") == []
    # the fleet's plan read the build directory already: no second round trip for it
    have = ShareRole(source="box1", installed=True)
    nothing = RecordedHost({})
    assert run_op(g4f.build, nothing, config=config, role=have) == []
    assert nothing.noops == [f"llama.cpp build {config.build_id} already installed"]


def _tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in files.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(content), 0o755
            tar.addfile(entry, io.BytesIO(content))
    return out.getvalue()


def test_the_unpack_script_places_a_verified_build_and_refuses_a_tampered_one(
    config: Any, tmp_path: Path
) -> None:
    root = tmp_path / "opt l; $(id)"
    config = config.model_copy(
        update={"build": config.build.model_copy(update={"install_root": str(root)})}
    )
    role = ShareRole(install=True, source="box0")
    host = RecordedHost(fact(LlamaCppBuildInfo, None, build_dir=config.build_dir))
    *_, unpack = run_op(g4f.install_build, host, config=config, role=role, artifact="a")
    upload = root / "build" / f"{config.build_id}.tar.gz"
    upload.parent.mkdir(parents=True)
    old = root / "builds" / "older-build"
    old.mkdir(parents=True)

    def place(content: bytes, recorded: bytes) -> subprocess.CompletedProcess[str]:
        upload.write_bytes(content)
        Path(f"{upload}.sha256").write_text(f"{hashlib.sha256(recorded).hexdigest()}  x\n")
        return run_here(unpack)

    good = _tarball({"./bin/llama-server": b"#!/bin/sh\n", "./BUILD-INFO": b"id=x\n"})
    bad = place(good + b"tampered", good)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    assert sorted(p.name for p in (root / "builds").iterdir()) == ["older-build"]
    assert not upload.exists()

    not_a_build = _tarball({"./README": b"hi"})
    refused = place(not_a_build, not_a_build)
    assert refused.returncode == 1 and "is not a llama.cpp build" in refused.stderr
    assert sorted(p.name for p in (root / "builds").iterdir()) == ["older-build"]

    done = place(good, good)
    assert done.returncode == 0, done.stderr
    placed = Path(config.build_dir)
    assert (placed / "BUILD-INFO").read_text() == "id=x\n" and (placed / MARKER).is_file()
    assert sorted(p.name for p in (root / "builds").iterdir()) == [config.build_id, "older-build"]
    assert not upload.exists()


def test_share_key_keeps_releases_apart() -> None:
    bookworm = {"ID": "debian", "VERSION_ID": "12", "VERSION_CODENAME": "bookworm"}
    trixie = {"ID": "debian", "VERSION_ID": "13", "VERSION_CODENAME": "trixie"}
    assert share_key("0c1e57098bba-1f2e3d4c", bookworm) == "0c1e57098bba-1f2e3d4c-debian12"
    assert share_key("0c1e57098bba-1f2e3d4c", trixie) == "0c1e57098bba-1f2e3d4c-debian13"
    assert share_key("0c1e57098bba-1f2e3d4c", {}) == "0c1e57098bba-1f2e3d4c-unknown"
    # one compile per release: a Debian 13 binary would not run on Debian 12's older glibc
    got = roles(
        [
            ShareHost("a", share_key("id1", bookworm), False),
            ShareHost("b", share_key("id1", trixie), False),
            ShareHost("c", share_key("id1", bookworm), False),
        ]
    )
    assert got["a"].make and got["b"].make and not got["c"].make
    assert got["c"].install and got["c"].source == "a"


def _url_model(data: bytes) -> ModelFile:
    return ModelFile(
        role="target",
        file="t.gguf",
        url="http://mirror/t.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
    )


def test_one_host_downloads_a_model_publishes_it_and_the_others_place_the_copy(
    tmp_path: Path,
) -> None:
    # the plan: a model is keyed by its sha256; a host holding it verified is left alone
    sha = hashlib.sha256(b"GGUF").hexdigest()
    plan = roles(
        [ShareHost("a", sha, True), ShareHost("b", sha, False), ShareHost("c", sha, False)]
    )
    assert plan["a"] == ShareRole(publish=True, source="a", installed=True)
    assert plan["b"] == plan["c"] == ShareRole(install=True, source="a")

    model = _url_model(b"GGUF")
    dest = "/var/lib/llama-models/x y/t.gguf"
    artifact = tmp_path / "models-shared" / model.sha256 / "t.gguf"
    missing = RecordedHost(fact(ModelFileStamp, None, path=dest))
    fetch, publish, install = ShareRole(make=True, publish=True, source="a"), plan["a"], plan["b"]
    # only the fetching host downloads; the others wait for the controller's copy
    assert run_op(g4f.model_file, missing, dest=dest, model=model, role=install) == []
    assert missing.noops == ["t.gguf: not downloaded here (from a)"]
    (download,) = run_op(g4f.model_file, missing, dest=dest, model=model, role=fetch)
    assert shipped_words(download) == (
        PLACE_MODEL_SCRIPT, [dest, model.sha256, "", MARKER, str(model.url)]
    )  # fmt: skip
    assert (
        run_op(g4f.install_model, missing, dest=dest, model=model, role=fetch, artifact="a") == []
    )
    assert (
        run_op(g4f.publish_model, missing, dest=dest, model=model, role=install, artifact="a") == []
    )

    mkdir, get, store = run_op(
        g4f.publish_model, missing, dest=dest, model=model, role=publish, artifact=str(artifact)
    )
    assert isinstance(mkdir, FunctionCommand) and isinstance(store, FunctionCommand)
    assert isinstance(get, FileDownloadCommand)
    assert (get.src, get.dest) == (dest, f"{artifact}.box1.partial")
    # the controller keeps the copy only when it hashes to the catalogue's sha256
    assert store.args == (f"{artifact}.box1.partial", str(artifact), "model t.gguf", model.sha256)

    check, _mkdir, up, place = run_op(
        g4f.install_model, missing, dest=dest, model=model, role=install, artifact=str(artifact)
    )
    assert isinstance(check, FunctionCommand)
    assert check.args == (str(artifact), "model t.gguf", "a", "the model in service is untouched")
    assert isinstance(up, FileUploadCommand) and (up.src, up.dest) == (
        str(artifact),
        f"{dest}.partial",
    )
    # uploaded, not downloaded: no URL
    assert shipped_words(place) == (PLACE_MODEL_SCRIPT, [dest, model.sha256, "", MARKER, ""])
    # the fleet's plan read the stamp already: no second round trip for it
    have, nothing = ShareRole(source="b", installed=True), RecordedHost({})
    assert run_op(g4f.model_file, nothing, dest=dest, model=model, role=have) == []
    assert run_op(g4f.install_model, nothing, dest=dest, model=model, role=have, artifact="a") == []
    assert nothing.noops == [f"{dest} present and verified"]


def test_a_received_model_is_kept_only_with_the_catalogue_sha256(tmp_path: Path) -> None:
    artifact = tmp_path / "models-shared" / "s" / "t.gguf"
    received = tmp_path / "t.gguf.box1.partial"
    received.write_bytes(b"GGUF tampered")
    want = hashlib.sha256(b"GGUF").hexdigest()
    problem = store_artifact(received, want, artifact)
    assert problem is not None and "t.gguf arrived with sha256" in problem
    assert not received.exists() and not artifact.exists()
    received.write_bytes(b"GGUF")
    assert store_artifact(received, want, artifact) is None
    assert artifact.read_bytes() == b"GGUF" and artifact_problem(artifact) is None
