"""Run the real pipeline on several ranks with the model's E-step raising on rank 1 only (a stand-in for any
rank-local fault). Without the abort hook rank 0 would wait forever in the statistics allreduce."""
import sys

from hpc_zsem.cli import main
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.parallel import get_comm

if get_comm().rank == 1:
    def broken_e_step(self, *args, **kwargs):
        raise RuntimeError("injected fault on rank 1")

    SSSC.e_step = broken_e_step

sys.exit(main(sys.argv[1:]))
