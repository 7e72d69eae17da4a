# Licensed under the Apache License, Version 2.0 (see LICENSE).
"""What the plugin takes from Pants' options: the binary, and the remote store to read through.
Imports nothing from Pants (`versions.remote_options` reads the options on each release)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteStore:
    """The remote CAS that digestfs should fetch missing blobs from: Pants' own."""

    address: str
    instance_name: str | None = None
    ca_certs_path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def remote_store_from_options(
    *,
    provider: str,
    cache_read: bool,
    execution: bool,
    address: str | None,
    instance_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    ca_certs_path: str | None = None,
    oauth_bearer_token: str | None = None,
) -> RemoteStore | None:
    """The remote store digestfs should read through to, from Pants' `[GLOBAL]` options.

    Only a REAPI store that Pants reads from (remote cache reads or remote execution) is passed:
    only then can blobs be remote-only, under `cache_content_behavior = "validate"` or `"defer"`.
    """
    if provider != "reapi" or not address or not (cache_read or execution):
        return None
    all_headers = dict(headers or {})
    if oauth_bearer_token:
        all_headers["authorization"] = f"Bearer {oauth_bearer_token}"
    return RemoteStore(
        address=address,
        instance_name=instance_name or None,
        ca_certs_path=ca_certs_path or None,
        headers=tuple(sorted(all_headers.items())),
    )


def binary_from_option(value: str | None) -> str | None:
    """A binary option's value as a binary to run, or None when it is off."""
    if value is None:
        return None
    value = value.strip()
    if not value or value.lower() in ("false", "none", "off"):
        return None
    return value




def mount_kwargs(remote: RemoteStore | None) -> dict:
    if remote is None:
        return {}
    return {
        "remote_store_address": remote.address,
        "remote_instance_name": remote.instance_name,
        "remote_ca_certs": remote.ca_certs_path,
        "remote_headers": dict(remote.headers),
    }
