"""Kernel headers for bcc: the overlay of Debian's split trees and choose_headers' precedence,
all on fixture trees (every root is a parameter)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.ebpf.headers import (
    KCONFIG,
    HeadersChoice,
    HeadersError,
    apply_headers,
    choose_headers,
    overlay,
)

RELEASE = "6.18.0-test"


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tree(root: Path, *files: str) -> Path:
    for name in files:
        touch(root / name, f"{root.name}:{name}")
    return root


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    out = {
        "modules_root": tmp_path / "lib/modules",
        "src_root": tmp_path / "usr/src",
        "kheaders": tmp_path / "sys/kernel/kheaders.tar.xz",
        "cache_dir": tmp_path / "cache",
    }
    out["modules_root"].mkdir(parents=True)
    out["src_root"].mkdir(parents=True)
    return out


def choose(roots: dict[str, Path], environ: dict[str, str] | None = None) -> HeadersChoice:
    given = {k: v for k, v in roots.items() if k != "src_root"}
    return choose_headers(RELEASE, environ=environ or {}, src_roots=(roots["src_root"],), **given)


def debian_pair(src_root: Path, version: str) -> tuple[Path, Path]:
    """Debian's split headers: generated files in -amd64, sources in -common."""
    build = tree(
        src_root / f"linux-headers-{version}-amd64",
        "Makefile",
        ".config",
        "include/generated/autoconf.h",
        "include/config/auto.conf",
        "arch/x86/include/generated/asm/orc_hash.h",
    )
    common = tree(
        src_root / f"linux-headers-{version}-common",
        "Makefile",
        KCONFIG,
        "include/linux/types.h",
        "include/uapi/linux/tcp.h",
        "arch/x86/include/asm/ptrace.h",
    )
    return build, common


# -- overlay ----------------------------------------------------------------------------------


def test_overlay_merges_common_directories_and_links_the_rest(tmp_path: Path) -> None:
    first = tree(
        tmp_path / "a",
        "Makefile",
        "include/generated/autoconf.h",
        "include/linux/version.h",
        "arch/x86/include/generated/asm/x.h",
        "only_a",
    )
    second = tree(
        tmp_path / "b",
        "Makefile",
        "include/linux/kconfig.h",
        "include/uapi/u.h",
        "arch/x86/include/asm/ptrace.h",
        "only_b/file",
    )
    merged = tmp_path / "merged"
    overlay(merged, [first, second])

    links = {
        "Makefile": first / "Makefile",  # in both, not a directory: the first wins
        "only_a": first / "only_a",
        "only_b": second / "only_b",
        "include/generated": first / "include/generated",
        "include/linux/version.h": first / "include/linux/version.h",
        "include/linux/kconfig.h": second / "include/linux/kconfig.h",
        "include/uapi": second / "include/uapi",
        "arch/x86/include/generated": first / "arch/x86/include/generated",
        "arch/x86/include/asm": second / "arch/x86/include/asm",
    }
    for name, target in links.items():
        assert (merged / name).is_symlink(), name
        assert os.readlink(merged / name) == str(target), name
    for name in ("include", "include/linux", "arch", "arch/x86", "arch/x86/include"):
        assert (merged / name).is_dir() and not (merged / name).is_symlink(), name
    assert (merged / "include/linux/kconfig.h").read_text() == "b:include/linux/kconfig.h"
    assert (merged / "only_b/file").read_text() == "b:only_b/file"


def test_overlay_prefers_the_first_when_a_name_is_a_file_in_one_and_a_dir_in_another(
    tmp_path: Path,
) -> None:
    first = tree(tmp_path / "a", "thing")
    second = tree(tmp_path / "b", "thing/inside")
    overlay(tmp_path / "m", [first, second])
    assert os.readlink(tmp_path / "m/thing") == str(first / "thing")


def test_overlay_twice_is_harmless(tmp_path: Path) -> None:
    first = tree(tmp_path / "a", "include/x.h")
    second = tree(tmp_path / "b", "include/y.h")
    overlay(tmp_path / "m", [first, second])
    overlay(tmp_path / "m", [first, second])
    assert sorted(p.name for p in (tmp_path / "m/include").iterdir()) == ["x.h", "y.h"]


# -- choose_headers precedence ------------------------------------------------------------------


def test_env_var_wins_over_everything(roots, tmp_path: Path) -> None:
    custom = tree(tmp_path / "custom", KCONFIG)
    tree(roots["modules_root"] / RELEASE / "build", KCONFIG)
    touch(roots["kheaders"])
    choice = choose(roots, {"BCC_KERNEL_SOURCE": str(custom)})
    assert choice == HeadersChoice("BCC_KERNEL_SOURCE", custom)


def test_env_var_without_headers_is_an_error(roots, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    tree(roots["modules_root"] / RELEASE / "build", KCONFIG)
    with pytest.raises(HeadersError) as caught:
        choose(roots, {"BCC_KERNEL_SOURCE": str(empty)})
    assert str(caught.value) == f"BCC_KERNEL_SOURCE={empty} has no {KCONFIG}"


def test_empty_env_var_is_ignored(roots) -> None:
    build = tree(roots["modules_root"] / RELEASE / "build", KCONFIG)
    assert choose(roots, {"BCC_KERNEL_SOURCE": ""}).path == build


def test_running_kernel_build_dir_wins_over_kheaders_and_usr_src(roots) -> None:
    build = tree(roots["modules_root"] / RELEASE / "build", KCONFIG)
    touch(roots["kheaders"])
    debian_pair(roots["src_root"], "6.1.0-56")
    assert choose(roots) == HeadersChoice(f"headers of the running kernel {RELEASE}", build)


def test_running_kernel_split_build_and_source(roots) -> None:
    """Debian's own layout for the running kernel: kconfig.h only under .../source."""
    running = roots["modules_root"] / RELEASE
    tree(running / "build", "include/generated/autoconf.h")
    tree(running / "source", KCONFIG)
    touch(roots["kheaders"])
    choice = choose(roots)
    assert choice == HeadersChoice(f"headers of the running kernel {RELEASE}", running / "build")


def test_kheaders_when_the_running_kernel_has_no_headers(roots) -> None:
    (roots["modules_root"] / RELEASE / "build").mkdir(parents=True)  # empty: not enough
    touch(roots["kheaders"])
    debian_pair(roots["src_root"], "6.1.0-56")
    choice = choose(roots)
    assert choice.path == roots["kheaders"]
    assert choice.how.startswith("the kernel's own ")


def test_merged_debian_pair_of_the_newest_version(roots) -> None:
    debian_pair(roots["src_root"], "6.1.0-9")
    build, common = debian_pair(roots["src_root"], "6.1.0-56")
    choice = choose(roots)
    merged = roots["cache_dir"] / "linux-headers-6.1.0-56-amd64"
    assert choice == HeadersChoice(
        "linux-headers-6.1.0-56-amd64 merged with its sources (layouts from BTF)", merged
    )
    assert (merged / KCONFIG).read_text() == f"linux-headers-6.1.0-56-common:{KCONFIG}"
    assert os.readlink(merged / "include/generated") == str(build / "include/generated")
    assert os.readlink(merged / "include/uapi") == str(common / "include/uapi")
    assert os.readlink(merged / "Makefile") == str(build / "Makefile")
    assert choose(roots) == choice  # the cached tree is reused


def test_version_order_is_numeric_not_textual(roots) -> None:
    debian_pair(roots["src_root"], "6.1.0-56")
    debian_pair(roots["src_root"], "6.12.1-1")
    assert choose(roots).path.name == "linux-headers-6.12.1-1-amd64"


def test_pair_found_through_the_modules_source_link(roots, tmp_path: Path) -> None:
    build = tree(roots["src_root"] / "linux-headers-6.1.0-56-cloud-amd64", "include/generated/a.h")
    sources = tree(tmp_path / "elsewhere/kernel-sources", KCONFIG)
    (roots["modules_root"] / "6.1.0-56-cloud-amd64").mkdir()
    (roots["modules_root"] / "6.1.0-56-cloud-amd64/source").symlink_to(sources)
    choice = choose(roots)
    merged = roots["cache_dir"] / build.name
    assert choice.path == merged
    assert os.readlink(merged / "include/linux") == str(sources / "include/linux")


def test_single_complete_tree_is_used_as_is(roots) -> None:
    build = tree(roots["src_root"] / "linux-headers-6.1.0-56-amd64", KCONFIG)
    assert choose(roots) == HeadersChoice(
        "linux-headers-6.1.0-56-amd64 (struct layouts from BTF)", build
    )
    assert not roots["cache_dir"].exists()


def test_incomplete_newest_tree_falls_back_to_an_older_complete_one(roots) -> None:
    tree(roots["src_root"] / "linux-headers-6.12.0-1-amd64", "include/generated/a.h")  # alone
    build, _ = debian_pair(roots["src_root"], "6.1.0-56")
    assert choose(roots).path == roots["cache_dir"] / build.name


def test_common_trees_alone_are_not_candidates(roots) -> None:
    tree(roots["src_root"] / "linux-headers-6.1.0-56-common", KCONFIG)
    with pytest.raises(HeadersError):
        choose(roots)


def test_no_headers_anywhere_says_what_to_install(roots) -> None:
    with pytest.raises(HeadersError) as caught:
        choose(roots)
    running = roots["modules_root"] / RELEASE
    assert str(caught.value) == (
        f"no kernel headers for bcc: nothing at {running}/build, no {roots['kheaders']}, and no "
        f"linux-headers-* in {roots['src_root']}; install them (Debian: apt-get install "
        "linux-headers-amd64)"
    )


def test_choose_headers_does_not_touch_the_process_environment(roots, monkeypatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    debian_pair(roots["src_root"], "6.1.0-56")
    choose(roots)
    assert "BCC_KERNEL_SOURCE" not in os.environ


# -- apply_headers ---------------------------------------------------------------------------------


def test_apply_points_bcc_at_a_merged_tree(roots) -> None:
    debian_pair(roots["src_root"], "6.1.0-56")
    choice = choose(roots)
    environ: dict[str, str] = {}
    apply_headers(choice, environ)
    assert environ == {"BCC_KERNEL_SOURCE": str(choice.path)}


def test_apply_leaves_bcc_alone_for_the_running_kernel_and_kheaders(roots) -> None:
    build = tree(roots["modules_root"] / RELEASE / "build", KCONFIG)
    environ: dict[str, str] = {}
    apply_headers(choose(roots), environ)
    apply_headers(HeadersChoice("the kernel's own kheaders", touch(roots["kheaders"])), environ)
    assert environ == {}
    assert build.is_dir()


def test_image_fallback_headers_are_used_after_the_nodes(tmp_path: Path) -> None:
    """The DaemonSet mounts the node's /usr/src; the image keeps Debian's headers under
    /opt/tcpacct/usr/src as the fallback."""
    node, image = tmp_path / "usr/src", tmp_path / "opt/tcpacct/usr/src"
    node.mkdir(parents=True)
    debian_pair(image, "6.1.0-56")
    modules = tmp_path / "lib/modules"
    modules.mkdir(parents=True)
    choice = choose_headers(
        RELEASE,
        environ={},
        modules_root=modules,
        src_roots=(node, image),
        kheaders=tmp_path / "none",
        cache_dir=tmp_path / "cache",
    )
    assert choice.path == tmp_path / "cache" / "linux-headers-6.1.0-56-amd64"
    assert (choice.path / "include/linux/kconfig.h").is_file()
