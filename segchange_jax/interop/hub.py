"""Fetching weights from the Hugging Face Hub into the standard HF cache.

Everything goes through `huggingface_hub`, so its environment variables apply unchanged:
`HF_HOME` / `HF_HUB_CACHE` (where the cache lives), `HF_HUB_OFFLINE=1` (cache only, no network)
and `HF_ENDPOINT` (a mirror for restricted networks). Every file handed back is checked against
the Hub's own checksum, which is the name of its blob in the cache (sha256 for LFS files, the git
blob sha1 for small ones): a truncated or corrupted blob is fetched again, never loaded.

A failure (offline and not cached, no network, unknown repo) raises `HubError`, one message that
names the repo, the file, the `hf download` command that fetches it, and the config field that
takes a local path instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence

# `owner/name` or a bare legacy name (`bert-base-uncased`), optionally `@revision`.
_REPO_ID = re.compile(r'^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_GIT_SHA1 = re.compile(r'^[0-9a-f]{40}$')


class HubError(RuntimeError):
  """A file could not be fetched from the Hub or its cache; the message says how to get it."""


def looks_like_repo_id(spec: str) -> bool:
  """True for `owner/name` or `name` (optionally `@revision`) that is not a local path."""
  return bool(_REPO_ID.match(spec)) and not spec.endswith(('.pth', '.pt', '.bin', '.safetensors',
                                                           '.gguf', '.npz'))


def split_revision(spec: str) -> tuple[str, str | None]:
  """'owner/name@rev' -> ('owner/name', 'rev'); no '@' -> (spec, None)."""
  repo, _, rev = spec.partition('@')
  return repo, (rev or None)


def _fetch_command(repo_id: str, revision: str | None, filenames: Sequence[str],
                   force: bool = False, include: Sequence[str] = ()) -> str:
  parts = ['hf', 'download', repo_id, *filenames, *[f"--include '{p}'" for p in include]]
  if revision:
    parts += ['--revision', revision]
  if force:
    parts.append('--force-download')
  return ' '.join(parts)


def _message(field: str, repo_id: str, revision: str | None, filenames: Sequence[str],
             reason: str, local_hint: str, include: Sequence[str] = ()) -> str:
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  name = repo_id + ('@' + revision if revision else '')
  target = filenames[0] if filenames else 'the model files'
  if constants.is_offline_mode():
    what = (f'{target} {"is" if filenames else "are"} not in the Hugging Face cache '
            f'({constants.HF_HUB_CACHE}) and '
            'HF_HUB_OFFLINE=1 forbids downloading it')
  else:
    what = (f'could not fetch {target} from the Hugging Face Hub ({constants.ENDPOINT}) '
            f'into the cache ({constants.HF_HUB_CACHE}): {reason}')
  command = _fetch_command(repo_id, revision, filenames[:1], include=include)
  return (f'{field}={name!r}: {what}.\nFetch it once where the Hub is reachable: '
          f'{command} (with the same HF_HOME, or copy '
          'that cache folder over; HF_ENDPOINT selects a mirror), or '
          f'{local_hint}.')


def file_checksum_ok(path: str) -> bool | None:
  """Checks a cached file against the Hub checksum in its blob name; None if there is none.

  huggingface_hub stores each file once as `blobs/<etag>` (linked from `snapshots/`); the etag
  is the sha256 of an LFS file's content or the git blob sha1 of a regular file.
  """
  real = os.path.realpath(path)
  etag = os.path.basename(real)
  if _SHA256.match(etag):
    h = hashlib.sha256()
  elif _GIT_SHA1.match(etag):
    h = hashlib.sha1()
    h.update(b'blob %d\0' % os.path.getsize(real))
  else:
    return None  # not a symlinked cache blob (e.g. a Windows copy): nothing to compare with
  with open(real, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest() == etag


def _discard(path: str) -> None:
  """Removes a bad blob and its snapshot link so the next download starts afresh."""
  real = os.path.realpath(path)
  for p in (path, real):
    try:
      os.remove(p)
    except FileNotFoundError:
      pass


def _verified(path: str, refetch, field: str, repo_id: str, revision: str | None,
              filename: str, local_hint: str) -> str:
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  if file_checksum_ok(path) is not False:
    return path
  if constants.is_offline_mode():
    raise HubError(
        f'{field}={repo_id!r}: the cached {filename} ({os.path.realpath(path)}) does not match the '
        "Hub's checksum (a truncated or corrupted download) and HF_HUB_OFFLINE=1 forbids fetching "
        f'it again. Re-fetch it: {_fetch_command(repo_id, revision, [filename], force=True)}, '
        f'or {local_hint}.')
  _discard(path)
  try:
    path = refetch()
  except (OSError, ValueError) as e:  # huggingface_hub's HTTP errors are OSErrors too
    raise HubError(_message(field, repo_id, revision, [filename], f'the cached copy failed the '
                            f'checksum and fetching it again failed: {_short(e)}',
                            local_hint)) from e
  if file_checksum_ok(path) is False:
    raise HubError(f'{field}={repo_id!r}: {filename} fetched twice and both copies fail the Hub '
                   f"checksum; check the network or the mirror (HF_ENDPOINT), or {local_hint}.")
  return path


def download_file(repo_id: str, filenames: Sequence[str], field: str, local_hint: str,
                  revision: str | None = None) -> str:
  """Path of the first of `filenames` that `repo_id` has, downloaded and checksum-verified.

  Args:
    repo_id: Hub repo, e.g. 'timm/resnet50.tv_in1k'.
    filenames: candidates in order of preference (e.g. model.safetensors, pytorch_model.bin);
      a candidate the repo does not have is skipped.
    field: the config field the id came from (named in errors).
    local_hint: how to use a local file instead (named in errors).
    revision: branch, tag or commit (default: main).
  """
  import huggingface_hub as hfh  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  reasons = []
  for name in filenames:
    def fetch(force=False, name=name):
      return hfh.hf_hub_download(repo_id, name, revision=revision, force_download=force)
    try:
      path = fetch()
    except errors.LocalEntryNotFoundError as e:  # offline / unreachable and not cached
      reasons.append(f'{name}: {_short(e)}')
      continue
    except errors.RemoteEntryNotFoundError:
      reasons.append(f'{name}: not in the repo')
      continue
    except errors.RepositoryNotFoundError as e:
      raise HubError(_message(field, repo_id, revision, filenames,
                              'no such repo on the Hub (or it is private/gated: run `hf auth '
                              f'login`) ({_short(e)})', local_hint)) from e
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
      # Network failure, a server error, or huggingface_hub's own size check of a cut download.
      reasons.append(f'{name}: {_short(e)}')
      continue
    return _verified(path, lambda fetch=fetch: fetch(force=True), field, repo_id, revision, name,
                     local_hint)
  raise HubError(_message(field, repo_id, revision, filenames, '; '.join(reasons), local_hint))


def download_snapshot(repo_id: str, allow_patterns: Sequence[str], field: str, local_hint: str,
                      revision: str | None = None) -> str:
  """Local folder with the files of `repo_id` matching `allow_patterns`, each checksum-verified."""
  import huggingface_hub as hfh  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  pats = list(allow_patterns)
  try:
    folder = hfh.snapshot_download(repo_id, revision=revision, allow_patterns=pats)
  except errors.RepositoryNotFoundError as e:
    raise HubError(_message(field, repo_id, revision, [], 'no such repo on the Hub (or it is '
                            f'private/gated: run `hf auth login`) ({_short(e)})',
                            local_hint, include=pats)) from e
  except (errors.HfHubHTTPError, OSError, ValueError) as e:
    raise HubError(_message(field, repo_id, revision, [], _short(e), local_hint,
                            include=pats)) from e
  for root, _, names in os.walk(folder):
    for n in names:
      path = os.path.join(root, n)
      rel = os.path.relpath(path, folder)
      _verified(path, lambda rel=rel: hfh.hf_hub_download(repo_id, rel, revision=revision,
                                                          force_download=True),
                field, repo_id, revision, rel, local_hint)
  return folder


def _short(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}'
