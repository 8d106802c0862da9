"""The worker group's sockets: a group on one machine listens on loopback only."""

from __future__ import annotations

import ipaddress

import pytest
from models import Classifier, loader

import raylight as pl
from raylight.driver.group import WorkerGroup
from raylight.rank.worker import Worker


def _recording_trainer_class() -> type[pl.Trainer]:
    # Defined in a function, so that Ray ships the actor class by value: the workers cannot
    # import this test module before they start.
    class SocketRecordingWorker(Worker):
        """Notes the sockets this rank's process starts listening on while its process group
        forms (the rendezvous store on rank 0, gloo's listener on every rank)."""

        @staticmethod
        def listening() -> set[tuple[str, int]]:
            import psutil

            return {
                (c.laddr.ip, c.laddr.port)
                for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }

        def open_rendezvous(self, host):
            self.before = self.listening()  # rank 0 opens the store's socket first
            return super().open_rendezvous(host)

        def init_process_group(self, *args, **kwargs):
            before = getattr(self, "before", None) or self.listening()
            super().init_process_group(*args, **kwargs)
            self.opened = sorted(self.listening() - before)

        def opened_sockets(self):
            import os

            return self.opened, dict(os.environ)

    class SocketRecordingGroup(WorkerGroup):
        worker_cls = SocketRecordingWorker

    class RecordingTrainer(pl.Trainer):
        worker_group_cls = SocketRecordingGroup

    return RecordingTrainer


@pytest.mark.slow
def test_a_group_on_one_machine_listens_on_loopback_only(ray_session):
    trainer = _recording_trainer_class()(
        num_workers=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), loader())
    assert trainer.global_step == 4  # the group trained over those sockets
    per_rank = trainer._group.run_on_all(trainer._group.worker_cls.opened_sockets)
    trainer.shutdown()
    (rank0_sockets, rank0_env), (rank1_sockets, rank1_env) = per_rank
    store = ("127.0.0.1", int(rank0_env["MASTER_PORT"]))
    assert store in rank0_sockets  # the rendezvous store, on loopback
    assert rank0_env["MASTER_ADDR"] == rank1_env["MASTER_ADDR"] == "127.0.0.1"
    assert rank0_env["GLOO_SOCKET_IFNAME"] == rank1_env["GLOO_SOCKET_IFNAME"]
    for ip, port in rank0_sockets + rank1_sockets:
        assert ipaddress.ip_address(ip).is_loopback, f"{ip}:{port} is reachable from outside"
    assert rank1_sockets, "gloo's listener was not seen: the check would prove nothing"
