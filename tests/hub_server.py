"""A local stand-in for the Hugging Face Hub's HTTP API, for offline tests.

It serves what huggingface_hub's `hf_hub_download` and `snapshot_download` ask for:
- `GET /api/models/{repo}/revision/{rev}`: repo info with the commit sha;
- `GET /api/models/{repo}/tree/{rev}`: the file listing (size, git blob id, LFS sha256);
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}`: the file with `X-Repo-Commit`, `ETag` (sha256 for
  LFS files, git blob sha1 otherwise) and `Content-Length`, honouring `Range` (resumed downloads);
- 404 with `X-Error-Code: RepoNotFound` / `EntryNotFound` as the Hub sends them.
With HF_ENDPOINT pointing at it, huggingface_hub itself writes the real cache layout. `cut_once`
makes the first GET of a file stop halfway through its body (a dropped connection).
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import threading
import urllib.parse

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.gguf', '.onnx')


def _git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class FakeHub:
  """`with FakeHub({'owner/name': {'file': b'...'}}) as hub:` then `hub.endpoint`."""

  def __init__(self, repos: dict[str, dict[str, bytes]]):
    self.repos = repos
    self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
    self.gets: collections.Counter = collections.Counter()  # (repo, file) -> GET requests
    self.cut_once: set[tuple[str, str]] = set()
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # keep pytest output clean
        pass

      def do_HEAD(self):  # pylint: disable=invalid-name
        hub.handle(self, body=False)

      def do_GET(self):  # pylint: disable=invalid-name
        hub.handle(self, body=True)

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  # ------------------------------------------------------------------------------ routing

  def _reply(self, req, status: int, headers: dict, data: bytes = b'', body: bool = True):
    req.send_response(status)
    for k, v in headers.items():
      req.send_header(k, str(v))
    req.send_header('Content-Length', str(headers.get('Content-Length', len(data))))
    req.end_headers()
    if body and data:
      req.wfile.write(data)

  def _error(self, req, code: str, repo: str | None, body: bool):
    headers = {'X-Error-Code': code, 'Content-Type': 'application/json'}
    if repo in self.commits:
      headers['X-Repo-Commit'] = self.commits[repo]
    data = json.dumps({'error': code}).encode()
    self._reply(req, 404, headers, data, body)

  def handle(self, req, body: bool):
    path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
    if path.startswith('/api/models/'):
      rest = path[len('/api/models/'):]
      for sep in ('/revision/', '/tree/'):
        if sep in rest:
          repo = rest.split(sep)[0]
          if repo not in self.repos:
            return self._error(req, 'RepoNotFound', repo, body)
          if sep == '/revision/':
            info = {'id': repo, 'sha': self.commits[repo],
                    'siblings': [{'rfilename': f} for f in self.repos[repo]]}
          else:
            info = [self._tree_entry(f, d) for f, d in self.repos[repo].items()]
          return self._reply(req, 200, {'Content-Type': 'application/json'},
                             json.dumps(info).encode(), body)
      return self._error(req, 'RepoNotFound', None, body)
    if '/resolve/' not in path:
      return self._error(req, 'RepoNotFound', None, body)
    repo, tail = path.lstrip('/').split('/resolve/', 1)
    if repo not in self.repos:
      return self._error(req, 'RepoNotFound', repo, body)
    _, filename = tail.split('/', 1)
    if filename not in self.repos[repo]:
      return self._error(req, 'EntryNotFound', repo, body)
    data = self.repos[repo][filename]
    lfs = filename.endswith(_LFS_SUFFIXES)
    etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
    headers = {'X-Repo-Commit': self.commits[repo], 'ETag': f'"{etag}"',
               'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream'}
    if not body:
      headers['Content-Length'] = len(data)
      return self._reply(req, 200, headers, b'', body=False)
    self.gets[(repo, filename)] += 1
    start = 0
    rng = req.headers.get('Range')
    if rng and rng.startswith('bytes='):
      start = int(rng[len('bytes='):].split('-')[0])
    part = data[start:]
    status = 206 if start else 200
    if start:
      headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
    if (repo, filename) in self.cut_once:
      self.cut_once.discard((repo, filename))
      headers['Content-Length'] = len(part)
      req.send_response(status)
      for k, v in headers.items():
        req.send_header(k, str(v))
      req.end_headers()
      req.wfile.write(part[:len(part) // 2])
      req.wfile.flush()
      req.close_connection = True
      return None
    return self._reply(req, status, headers, part, body)

  @staticmethod
  def _tree_entry(filename: str, data: bytes) -> dict:
    entry = {'type': 'file', 'oid': _git_blob_sha1(data), 'size': len(data), 'path': filename}
    if filename.endswith(_LFS_SUFFIXES):
      entry['lfs'] = {'oid': hashlib.sha256(data).hexdigest(), 'size': len(data),
                      'pointerSize': 134}
    return entry
