"""tensorrt_llm/llmapi/mpi_session.py's MpiCommSession: rank 0 of `comm` drives the other ranks,
which serve `comm` with mpi4py's MPICommExecutor (tensorrt_llm/llmapi/mgmn_worker_node.py)."""

from concurrent.futures import ThreadPoolExecutor


class MpiCommSession:
    def __init__(self, comm=None, n_workers: int = 1):
        self.comm = comm
        self.n_workers = n_workers
        if n_workers <= 0:
            raise ValueError(f"n_workers must be non-negative, but got {n_workers}")
        if self.comm.Get_rank() != 0:
            raise RuntimeError(f"only rank 0 can start multi-node session, got {self.comm.Get_rank()}")
        if self.comm.Get_size() != n_workers:
            raise ValueError(f"n_workers must be equal to the number of processes in MPI, got {n_workers}")
        # imported here, not at module level: importing mpi4py.MPI initialises MPI, and an in-process
        # test that only imports this package would start an Open MPI singleton whose environment
        # every later subprocess (mpirun among them) would inherit
        from mpi4py.futures import MPICommExecutor

        self.thread_pool = ThreadPoolExecutor(max_workers=2)
        self._comm_executor = MPICommExecutor(self.comm)
        self.mpi_pool = self._comm_executor.__enter__()

    def submit(self, task, *args, **kwargs):
        worker_futures = [self.mpi_pool.submit(task, *args, **kwargs) for _ in range(self.n_workers - 1)]
        return [self.thread_pool.submit(task, *args, **kwargs)] + worker_futures

    def submit_sync(self, task, *args, **kwargs):
        return [f.result() for f in self.submit(task, *args, **kwargs)]

    def shutdown(self, wait=True):
        if self.mpi_pool is not None:
            self._comm_executor.__exit__(None, None, None)
            self.mpi_pool = None
        if self.thread_pool is not None:
            self.thread_pool.shutdown(wait=wait)
            self.thread_pool = None
