#!/usr/bin/env python3
"""docker-compose v1 (1.29.2) scenarios that must behave through the offload
proxy exactly as they do against dockerd: up/ps/logs/exec/run/down of a
two-service project with a named network and volume.

compose's exec and run go through the `docker` CLI by default and through
docker-py + dockerpty with COMPOSE_INTERACTIVE_NO_CLI=1; both paths are
checked. Run with DOCKER_HOST pointing at the proxy and OFFLOAD_TEST_IMAGE
naming a local busybox image. Prints one line per check, then
"N passed, M failed"; exits 1 if any check failed.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

import docker

COMPOSE = '/usr/bin/docker-compose'
IMAGE = os.environ.get('OFFLOAD_TEST_IMAGE', 'offload-test/busybox:latest')
PROJECT = f'offload-test-{secrets.token_hex(4)}'
PROJECT_LABEL = f'com.docker.compose.project={PROJECT}'

SCRIPT_BUDGET_S = 60      # checks; cleanup comes on top, well under 90 s
COMMAND_TIMEOUT_S = 20    # one docker-compose invocation
CLEANUP_TIMEOUT_S = 15
API_TIMEOUT_S = 15


class CheckFailed(Exception):
    pass


def expect(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f'{what}: expected {expected!r}, got {actual!r}')


def compose_file():
    # JSON is valid YAML, and sidesteps quoting of the shell commands.
    def service(name):
        return {
            'image': IMAGE,
            'command': ['sh', '-c', f'echo {name}-ready; exec sleep 300'],
            'networks': ['backend'],
            'volumes': ['data:/data'],
        }
    return {
        'version': '2.4',
        'services': {'web': service('web'), 'worker': service('worker')},
        'networks': {'backend': {}},
        'volumes': {'data': {}},
    }


def run_command(argv, timeout, env, what):
    """subprocess.run with the whole process group killed on timeout:
    compose's exec/run spawn the docker CLI, which must not outlive us."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CheckFailed(f'{what} timed out after {timeout:.0f}s')
    except BaseException:   # SIGTERM or Ctrl-C: do not leave the group running
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class Project:
    def __init__(self, directory, client, deadline):
        self.file = os.path.join(directory, 'docker-compose.yml')
        with open(self.file, 'w') as f:
            json.dump(compose_file(), f, indent=2)
        self.client = client
        self.deadline = deadline

    def compose(self, *args, via_docker_py=False, timeout=COMMAND_TIMEOUT_S):
        remaining = self.deadline - time.monotonic()
        if remaining < 1:
            raise CheckFailed('script time budget exhausted')
        return self.compose_unbounded(*args, via_docker_py=via_docker_py,
                                      timeout=min(timeout, remaining))

    def compose_unbounded(self, *args, via_docker_py=False, timeout=COMMAND_TIMEOUT_S):
        env = dict(os.environ)
        env.pop('COMPOSE_INTERACTIVE_NO_CLI', None)
        if via_docker_py:
            env['COMPOSE_INTERACTIVE_NO_CLI'] = '1'
        argv = [COMPOSE, '--ansi', 'never', '-p', PROJECT, '-f', self.file, *args]
        return run_command(argv, timeout, env, what=' '.join(args))

    def leftovers(self):
        """Everything on the engine that carries this project's label."""
        filters = {'label': PROJECT_LABEL}
        return {
            'containers': self.client.containers.list(all=True, filters=filters),
            'networks': self.client.networks.list(filters=filters),
            'volumes': self.client.volumes.list(filters=filters),
        }


def expect_exit(result, code, what):
    if result.returncode != code:
        stderr = ' '.join(result.stderr.decode(errors='replace').split())[-400:]
        raise CheckFailed(f'{what}: exit {result.returncode}, expected {code}; stderr: {stderr}')


# --------------------------------------------------------------------------
# Checks, run in the order they are defined; each builds on the previous.

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def up_detached(p):
    expect_exit(p.compose('up', '-d'), 0, 'up -d')


@check
def ps_lists_two_running_containers(p):
    result = p.compose('ps', '-q')
    expect_exit(result, 0, 'ps -q')
    ids = result.stdout.decode().split()
    expect(len(ids), 2, 'ps -q line count')
    services = set()
    for cid in ids:
        container = p.client.containers.get(cid)
        expect(container.attrs['State']['Running'], True, f'{container.name} running')
        expect(container.labels.get('com.docker.compose.project'), PROJECT, 'project label')
        services.add(container.labels.get('com.docker.compose.service'))
    expect(services, {'web', 'worker'}, 'services of ps -q')


@check
def logs_show_both_services(p):
    # The containers print once they start; give them a few seconds.
    deadline = time.monotonic() + 5
    while True:
        result = p.compose('logs', '--no-color')
        expect_exit(result, 0, 'logs')
        lines = result.stdout.decode(errors='replace').splitlines()
        counts = {m: sum(line.endswith(f'| {m}') for line in lines)
                  for m in ('web-ready', 'worker-ready')}
        if counts == {'web-ready': 1, 'worker-ready': 1} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    expect(counts, {'web-ready': 1, 'worker-ready': 1}, 'ready lines in logs')


def check_exec(p, via_docker_py):
    result = p.compose('exec', '-T', 'web', 'echo', 'hi', via_docker_py=via_docker_py)
    expect_exit(result, 0, 'exec -T web echo hi')
    expect(result.stdout, b'hi\n', 'exec stdout')


@check
def exec_via_docker_cli(p):
    check_exec(p, via_docker_py=False)


@check
def exec_via_docker_py(p):
    check_exec(p, via_docker_py=True)


def check_run_rm(p, via_docker_py):
    result = p.compose('run', '--rm', '-T', 'worker', 'sh', '-c', 'exit 4',
                       via_docker_py=via_docker_py)
    expect_exit(result, 4, "run --rm -T worker sh -c 'exit 4'")
    one_offs = p.client.containers.list(
        all=True, filters={'label': [PROJECT_LABEL, 'com.docker.compose.oneoff=True']})
    expect([c.name for c in one_offs], [], 'one-off containers left after run --rm')


@check
def run_rm_exit_code_via_docker_cli(p):
    check_run_rm(p, via_docker_py=False)


@check
def run_rm_exit_code_via_docker_py(p):
    check_run_rm(p, via_docker_py=True)


@check
def down_removes_everything(p):
    expect_exit(p.compose('down', '-v', '--timeout', '1'), 0, 'down -v')
    left = {kind: [r.name for r in items] for kind, items in p.leftovers().items()}
    expect(left, {'containers': [], 'networks': [], 'volumes': []}, 'resources left by down -v')


# --------------------------------------------------------------------------
# Harness

def cleanup(p):
    """down -v, then force-remove anything still labelled with the project
    (which is unique to this run, so nothing else can match)."""
    try:
        p.compose_unbounded('down', '-v', '--timeout', '1', timeout=CLEANUP_TIMEOUT_S)
    except Exception as e:
        print(f'cleanup: down -v: {e}', file=sys.stderr)
    try:
        left = p.leftovers()
        for c in left['containers']:
            c.remove(force=True, v=True)
        for resource in left['networks'] + left['volumes']:
            resource.remove()
    except Exception as e:
        print(f'cleanup: {e}', file=sys.stderr)


def main():
    # SIGTERM from the test runner unwinds through the cleanup finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + SCRIPT_BUDGET_S
    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)
        client.ping()
    except Exception as e:
        print(f'FAIL connect: {" ".join(str(e).split())}', flush=True)
        print('0 passed, 1 failed', flush=True)
        return 1
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix=f'{PROJECT}-') as directory:
        project = Project(directory, client, deadline)
        try:
            for fn in CHECKS:
                try:
                    fn(project)
                    error = None
                except Exception as e:
                    error = f'{type(e).__name__}: {e}'
                if error is None:
                    passed += 1
                    print(f'ok   {fn.__name__}', flush=True)
                else:
                    failed += 1
                    print(f'FAIL {fn.__name__}: {" ".join(error.split())}', flush=True)
        finally:
            cleanup(project)
    print(f'{passed} passed, {failed} failed', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
