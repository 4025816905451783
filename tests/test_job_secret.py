"""The job's CURVE keys come from a 0600 secret file, never from MPI's unencrypted wire."""

from __future__ import annotations

import stat

import pytest
import zmq

from slurmserve.job_secret import SECRET_ENV, JobKeys, load_job_keys, write_job_secret


class OneRank:
    """COMM_WORLD of a world of one (what load_job_keys needs of it)."""

    def Get_rank(self):
        return 0

    def bcast(self, obj, root=0):
        return obj


def test_secret_file_is_private_and_every_rank_derives_the_same_keys(tmp_path):
    path = write_job_secret(tmp_path / "logs" / "job_secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    a = load_job_keys(OneRank(), env={SECRET_ENV: str(path)})
    b = load_job_keys(OneRank(), env={SECRET_ENV: str(path)})
    assert a.source == "file"
    labels = [JobKeys.control(), JobKeys.kv_events(0), JobKeys.kv_events(1), JobKeys.kv_side_channel(0)]
    assert [a.keypair(x) for x in labels] == [b.keypair(x) for x in labels]
    assert len({a.public(x) for x in labels}) == len(labels), "one key pair per socket"
    other = JobKeys(write_job_secret(tmp_path / "other").read_bytes(), "file")
    assert other.public(JobKeys.control()) != a.public(JobKeys.control()), "a new run, new keys"


def test_derived_keys_work_for_curve(tmp_path):
    """A server with a derived pair accepts a client that derived its public key, and the key is
    all a client needs: without the secret it cannot be had."""
    keys = JobKeys(write_job_secret(tmp_path / "s").read_bytes(), "file")
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        server.curve_server = True
        server.curve_publickey, server.curve_secretkey = keys.keypair(keys.control())
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.curve_serverkey = keys.public(keys.control())
        client.curve_publickey, client.curve_secretkey = zmq.curve_keypair()
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert server.poll(5000) and server.recv_multipart()[1] == b"hello"
    finally:
        server.close(0)
        client.close(0)
        ctx.term()


def test_an_unreadable_secret_file_is_one_line(tmp_path):
    with pytest.raises(OSError, match=f"{SECRET_ENV}=.*No such file"):
        load_job_keys(OneRank(), env={SECRET_ENV: str(tmp_path / "missing")})


def test_without_a_file_rank_0_broadcasts_one(caplog):
    keys = load_job_keys(OneRank(), env={})
    assert keys.source == "mpi"
    assert "not encrypted" in caplog.text


def test_serve_gives_the_ranks_a_secret_file(tiny_model_dir, tmp_path):
    """`slurmserve serve` writes the job secret before mpirun starts: no rank falls back to sending
    one over MPI, and the deployment's CURVE sockets work with the derived keys."""
    from slurmserve.tools.local_deployment import LocalDeployment
    from test_serve_sim import MODEL, sim_config
    with LocalDeployment(tmp_path, sim_config(tiny_model_dir, workers=1)) as dep:
        r = dep.client().completions.create(model=MODEL, prompt="keys", max_tokens=2)
        assert r.usage.completion_tokens == 2
        logs = "".join(p.read_text() for p in (dep.dir / "logs").glob("rank-*.log"))
    assert "not encrypted" not in logs and "no SLURMSERVE_JOB_SECRET_FILE" not in logs
