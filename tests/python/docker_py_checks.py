#!/usr/bin/env python3
"""docker-py scenarios that must behave through the offload proxy exactly as
they do against dockerd: hijacked attach/exec, half-close, streaming logs,
events, stats and build/load progress, archives, chunked request bodies.

Run with DOCKER_HOST pointing at the proxy (or the engine, to check the
checks) and OFFLOAD_TEST_IMAGE naming a local busybox image. Prints one line
per check, then "N passed, M failed"; exits 1 if any check failed.
"""

import io
import json
import os
import queue
import secrets
import signal
import socket
import struct
import sys
import tarfile
import threading
import time

import docker

IMAGE = os.environ.get('OFFLOAD_TEST_IMAGE', 'offload-test/busybox:latest')
RUN_ID = secrets.token_hex(4)
PREFIX = f'offload-test-{RUN_ID}'
# Every container and built image carries this label, so a final sweep can
# find whatever a check created but did not get to record.
RUN_LABEL = {'offload-test.run': RUN_ID}

SCRIPT_BUDGET_S = 70      # checks; cleanup comes on top, well under 90 s
CHECK_TIMEOUT_S = 20      # default per check; a hung check is abandoned
API_TIMEOUT_S = 20        # socket timeout of ordinary API requests
CLEANUP_TIMEOUT_S = 15


class CheckFailed(Exception):
    pass


def expect(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f'{what}: expected {expected!r}, got {actual!r}')


# --------------------------------------------------------------------------
# Resources: each check gets a Ctx that records what it creates *before*
# creating it, so the harness can remove it even if the check hangs or dies.

class Ctx:
    def __init__(self, client):
        self.client = client
        self.api = client.api
        self.containers = []   # names
        self.images = []       # tags

    def container_name(self):
        name = f'{PREFIX}-{secrets.token_hex(3)}'
        self.containers.append(name)
        return name

    def image_tag(self, kind):
        tag = f'{PREFIX}-{kind}:latest'
        self.images.append(tag)
        return tag

    def create(self, command, name=None, **kwargs):
        name = name or self.container_name()
        return self.api.create_container(
            IMAGE, command, name=name, labels=RUN_LABEL, **kwargs)['Id']

    def started(self, command, **kwargs):
        cid = self.create(command, **kwargs)
        self.api.start(cid)
        return cid

    def cleanup(self, api):
        for name in self.containers:
            ignore_missing(api.remove_container, name, force=True, v=True)
        for tag in self.images:
            # Untags only when other tags remain (the save/load check
            # re-tags the base image); deletes the image otherwise.
            ignore_missing(api.remove_image, tag)


def ignore_missing(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except docker.errors.NotFound:
        pass
    except Exception as e:  # keep cleaning the rest; report on stderr
        print(f'cleanup: {fn.__name__}{args}: {e}', file=sys.stderr)


# --------------------------------------------------------------------------
# Helpers

def make_tar(files):
    """An uncompressed tar holding {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_tar(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode='r') as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def parse_frames(data):
    """Split a multiplexed attach stream into (stream_type, payload) pairs."""
    frames, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 8:
            raise CheckFailed(f'truncated frame header at byte {pos}: {data[pos:]!r}')
        stream, size = struct.unpack('>BxxxL', data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + size]
        if len(payload) != size:
            raise CheckFailed(f'frame at byte {pos} announces {size} bytes, has {len(payload)}')
        frames.append((stream, payload))
        pos += 8 + size
    return frames


def recv_until_eof(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


def retag_saved_image(archive, tag):
    """Rewrite a `docker save` archive so that loading it only adds `tag`.

    The legacy `repositories` file is dropped so the load cannot touch the
    original tag; manifest.json alone drives the load."""
    src = tarfile.open(fileobj=io.BytesIO(archive), mode='r')
    out = io.BytesIO()
    with src, tarfile.open(fileobj=out, mode='w') as dst:
        for member in src:
            if member.name == 'repositories':
                continue
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == 'manifest.json':
                manifest = json.loads(data)
                manifest[0]['RepoTags'] = [tag]
                data = json.dumps(manifest).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


# --------------------------------------------------------------------------
# Checks, run in the order they are defined.

CHECKS = []


def check(timeout=CHECK_TIMEOUT_S):
    def register(fn):
        fn.timeout = timeout
        CHECKS.append(fn)
        return fn
    return register


@check()
def ping_and_version(ctx):
    expect(ctx.client.ping(), True, 'ping()')
    version = ctx.client.version()
    for key in ('ApiVersion', 'Version'):
        if not isinstance(version.get(key), str) or not version[key]:
            raise CheckFailed(f'version()[{key!r}] is {version.get(key)!r}')


@check()
def run_exit_code_and_logs(ctx):
    # containers.run (detach=False) is create, start, wait, then logs.
    name = ctx.container_name()
    try:
        ctx.client.containers.run(
            IMAGE, "sh -c 'echo out; echo err >&2; exit 3'", name=name, labels=RUN_LABEL)
    except docker.errors.ContainerError as e:
        expect(e.exit_status, 3, 'ContainerError.exit_status')
        expect(e.stderr, b'err\n', 'ContainerError.stderr')
    else:
        raise CheckFailed('containers.run did not raise ContainerError for exit 3')
    container = ctx.client.containers.get(name)
    expect(container.wait(timeout=10)['StatusCode'], 3, 'wait StatusCode')
    expect(container.logs(stdout=True, stderr=False), b'out\n', 'stdout logs')
    expect(container.logs(stdout=False, stderr=True), b'err\n', 'stderr logs')


@check(timeout=50)
def exec_run_200_in_a_row(ctx):
    # docker-py loses output that arrives in the same recv() as the 101
    # head (docker-py#3332); the proxy must never coalesce them.
    container = ctx.client.containers.get(ctx.started('sleep 300'))
    for i in range(200):
        result = container.exec_run(['echo', f'line-{i}'])
        expect((result.exit_code, result.output), (0, f'line-{i}\n'.encode()), f'exec #{i}')


@check()
def exec_run_demux_and_exit_code(ctx):
    container = ctx.client.containers.get(ctx.started('sleep 300'))
    result = container.exec_run(['sh', '-c', 'echo to-out; echo to-err >&2'], demux=True)
    expect(result.exit_code, 0, 'demux exec exit code')
    expect(result.output, (b'to-out\n', b'to-err\n'), 'demuxed (stdout, stderr)')
    result = container.exec_run(['sh', '-c', 'exit 7'])
    expect((result.exit_code, result.output), (7, b''), 'exec exit 7')


@check()
def attach_socket_half_close(ctx):
    # With stdin_open docker-py also sets StdinOnce: the daemon closes cat's
    # stdin when our write half closes, so cat exits 0 only if the proxy
    # propagates the half-close.
    cid = ctx.create('cat', stdin_open=True, tty=False)
    expect(ctx.api.inspect_container(cid)['Config']['StdinOnce'], True, 'StdinOnce')
    sock = ctx.api.attach_socket(cid, params={'stdin': 1, 'stdout': 1, 'stream': 1})
    raw = sock._sock
    raw.settimeout(15)
    try:
        ctx.api.start(cid)
        raw.sendall(b'hello\n')
        raw.shutdown(socket.SHUT_WR)
        data = recv_until_eof(raw)
    finally:
        sock.close()
        raw.close()
    frames = parse_frames(data)
    expect(b''.join(payload for _, payload in frames), b'hello\n', 'attached stdout')
    expect({stream for stream, _ in frames}, {1}, 'frame stream types')
    expect(ctx.api.wait(cid, timeout=10)['StatusCode'], 0, 'cat exit code')


@check()
def logs_follow_streams_lines(ctx):
    cid = ctx.started("sh -c 'for i in 1 2 3 4 5; do echo n$i; sleep 0.2; done'")
    arrivals = [(time.monotonic(), chunk)
                for chunk in ctx.api.logs(cid, stream=True, follow=True)]
    expect(b''.join(chunk for _, chunk in arrivals), b'n1\nn2\nn3\nn4\nn5\n', 'followed logs')
    # The lines are written over ~0.8 s; a proxy that buffers the body
    # would deliver them all at once when the container exits.
    spread = arrivals[-1][0] - arrivals[0][0]
    if spread < 0.3:
        raise CheckFailed(f'all output arrived within {spread:.2f}s: stream was buffered')
    expect(ctx.api.inspect_container(cid)['State']['Running'], False, 'running after stream end')


@check(timeout=30)
def build_progress_stream(ctx):
    tag = ctx.image_tag('build')
    marker = f'built-{RUN_ID}'
    context = make_tar({'Dockerfile': f'FROM {IMAGE}\nRUN echo {marker}\n'.encode()})
    # No `version=2`: the classic builder, whose output is a JSON stream.
    messages = list(ctx.api.build(
        fileobj=io.BytesIO(context), custom_context=True, tag=tag, labels=RUN_LABEL,
        rm=True, forcerm=True, nocache=True, decode=True))
    if not all(isinstance(m, dict) for m in messages):
        raise CheckFailed(f'non-dict progress messages: {messages!r}')
    errors = [m for m in messages if 'error' in m or 'errorDetail' in m]
    if errors or len(messages) < 3:
        raise CheckFailed(f'build messages: {messages!r}')
    streams = [m.get('stream', '') for m in messages]
    image_id = ctx.api.inspect_image(tag)['Id']
    for line in (f'{marker}\n', f'Successfully built {image_id[7:19]}\n',
                 f'Successfully tagged {tag}\n'):
        if line not in streams:
            raise CheckFailed(f'no stream message {line!r} in {streams!r}')


@check()
def image_save_and_load_stream(ctx):
    tag = ctx.image_tag('load')
    base_id = ctx.api.inspect_image(IMAGE)['Id']
    saved = b''.join(ctx.api.get_image(IMAGE))   # a streamed tar download
    messages = list(ctx.api.load_image(retag_saved_image(saved, tag)))
    expect([m.get('stream') for m in messages], [f'Loaded image: {tag}\n'], 'load messages')
    expect(ctx.api.inspect_image(tag)['Id'], base_id, 'loaded image id')


@check()
def image_import_chunked_body(ctx):
    tag = ctx.image_tag('import')
    rootfs = make_tar({'hello.txt': b'imported\n'})
    # A generator makes requests send the body with chunked encoding, as
    # the Go client does for tar uploads.
    pieces = (rootfs[i:i + 4096] for i in range(0, len(rootfs), 4096))
    text = ctx.api.import_image_from_data(
        pieces, repository=tag.rsplit(':', 1)[0], tag='latest',
        changes=[f'LABEL offload-test.run={RUN_ID}'])
    messages = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not messages or not str(messages[-1].get('status', '')).startswith('sha256:'):
        raise CheckFailed(f'import messages: {messages!r}')
    expect(ctx.api.inspect_image(tag)['Id'], messages[-1]['status'], 'imported image id')


@check()
def events_stream_delivers_lifecycle(ctx):
    name = ctx.container_name()
    # dockerd flushes the response head before it subscribes, so ask for
    # events since a second ago: the replay closes that race.
    events = ctx.api.events(decode=True, filters={'container': name},
                            since=int(time.time()) - 1)
    received = queue.Queue()

    def pump():
        try:
            for event in events:
                received.put(event)
        except Exception:
            pass   # close() below ends the stream with a socket error
        finally:
            received.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        cid = ctx.create('true', name=name)
        ctx.api.start(cid)
        ctx.api.wait(cid, timeout=10)
        ctx.api.remove_container(cid)
        actions = collect_actions(received, name, until='destroy', timeout=10)
    finally:
        events.close()
    expected = ['create', 'start', 'die', 'destroy']
    expect([a for a in actions if a in expected], expected, 'lifecycle events in order')


def collect_actions(received, name, until, timeout):
    actions, deadline = [], time.monotonic() + timeout
    while until not in actions:
        try:
            event = received.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise CheckFailed(f'no {until!r} event within {timeout}s; got {actions}')
        if event is None:
            raise CheckFailed(f'events stream ended early; got {actions}')
        actor = event.get('Actor', {}).get('Attributes', {}).get('name')
        if event.get('Type') != 'container' or actor != name:
            raise CheckFailed(f'event outside the filter: {event!r}')
        actions.append(event['Action'])
    return actions


@check()
def stats_snapshot_and_stream(ctx):
    cid = ctx.started('sleep 300')
    snapshot = ctx.api.stats(cid, stream=False)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get('memory_stats'), dict):
        raise CheckFailed(f'stats(stream=False): {snapshot!r}')
    expect(snapshot.get('id'), cid, 'stats id')
    # The stream sends one sample a second and never ends: a proxy that
    # buffers it never delivers the second one.
    samples = ctx.api.stats(cid, stream=True, decode=True)
    try:
        first, second = next(samples), next(samples)
    finally:
        samples.close()
    if first.get('read') == second.get('read'):
        raise CheckFailed(f'two samples with the same read time {first.get("read")!r}')


@check()
def wait_blocks_until_exit(ctx):
    cid = ctx.started('sleep 1')
    started = time.monotonic()
    result = ctx.api.wait(cid, timeout=15)
    elapsed = time.monotonic() - started
    expect(result.get('StatusCode'), 0, 'wait StatusCode')
    if elapsed < 0.5:
        raise CheckFailed(f'wait returned after {elapsed:.2f}s, before `sleep 1` ended')


@check()
def archive_round_trip(ctx):
    cid = ctx.create('true')
    payload = bytes(range(256)) * 64 + b'\r\n\x00end'   # binary-safe relay
    expect(ctx.api.put_archive(cid, '/tmp', make_tar({'payload.bin': payload})),
           True, 'put_archive')
    chunks, stat = ctx.api.get_archive(cid, '/tmp/payload.bin')
    expect((stat.get('name'), stat.get('size')), ('payload.bin', len(payload)), 'path stat')
    expect(read_tar(b''.join(chunks)), {'payload.bin': payload}, 'archive contents')


@check()
def volume_bind_round_trip(ctx):
    import tempfile
    with tempfile.TemporaryDirectory(prefix='offload-test-bind-') as local:
        with open(os.path.join(local, 'in.txt'), 'w') as f:
            f.write('from the host')
        host_config = ctx.api.create_host_config(binds={local: {'bind': '/w', 'mode': 'rw'}})
        cid = ctx.create(['sh', '-c', 'cat /w/in.txt > /w/out.txt'], host_config=host_config)
        inspect = ctx.api.inspect_container(cid)
        expect(inspect['HostConfig']['Binds'], [f'{local}:/w:rw'], 'inspect Binds')
        expect([m['Source'] for m in inspect['Mounts']], [local], 'inspect Mounts[].Source')
        ctx.api.start(cid)
        expect(ctx.api.wait(cid, timeout=15).get('StatusCode'), 0, 'wait StatusCode')
        with open(os.path.join(local, 'out.txt')) as f:
            expect(f.read(), 'from the host', "the container's write, back on the host")


# --------------------------------------------------------------------------
# Harness

def run_check(fn, client, cleanup_api, timeout):
    """Run fn in a thread so a hung stream cannot block the script; always
    remove what it created. Returns None on success, else the reason."""
    ctx = Ctx(client)
    outcome = {}

    def target():
        try:
            fn(ctx)
            outcome['error'] = None
        except BaseException as e:
            outcome['error'] = f'{type(e).__name__}: {e}'

    thread = threading.Thread(target=target, name=fn.__name__, daemon=True)
    thread.start()
    try:
        thread.join(timeout)
    finally:
        ctx.cleanup(cleanup_api)
    if 'error' not in outcome:
        thread.join(2)   # removing its containers usually unblocks it
        return f'timed out after {timeout:.0f}s'
    return outcome['error']


def sweep(api):
    """Remove any container of this run that a check did not record."""
    for c in api.containers(all=True, filters={'label': f'offload-test.run={RUN_ID}'}):
        print(f'sweep: removing leftover container {c["Id"][:12]}', file=sys.stderr)
        ignore_missing(api.remove_container, c['Id'], force=True, v=True)


def main():
    # SIGTERM from the test runner unwinds through the cleanup finallys.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + SCRIPT_BUDGET_S
    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)   # negotiates via GET /version
    except Exception as e:
        print(f'FAIL connect: {" ".join(str(e).split())}', flush=True)
        print('0 passed, 1 failed', flush=True)
        return 1
    # A separate connection pool, so cleanup never waits behind a hung check.
    cleanup_api = docker.from_env(timeout=CLEANUP_TIMEOUT_S, version=client.api.api_version).api
    passed = failed = 0
    try:
        for fn in CHECKS:
            remaining = deadline - time.monotonic()
            if remaining < 2:
                error = 'not run: script time budget exhausted'
            else:
                error = run_check(fn, client, cleanup_api, min(fn.timeout, remaining))
            if error is None:
                passed += 1
                print(f'ok   {fn.__name__}', flush=True)
            else:
                failed += 1
                print(f'FAIL {fn.__name__}: {" ".join(error.split())}', flush=True)
    finally:
        sweep(cleanup_api)
    print(f'{passed} passed, {failed} failed', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
