"""The CUDA-graph training step (run.cuda_graph_step)."""

from __future__ import annotations

import torch


class GraphedStep:
    """One optimizer step (forward, backward, gradient clipping or norm, AdamW) as one CUDA graph, replayed every
    step (run.cuda_graph_step): one launch instead of thousands of kernels, no host work between them.

    `loss_fn(inputs) -> float32[]` maps a dict of device tensors (the same shapes and dtypes every step) to the loss.
    The first `warmup` calls are real steps run eagerly on a side stream (cuDNN, autotuning and torch.compile settle
    there and AdamW creates its state); the next one captures the graph (capture runs nothing), and every call from
    then on copies its inputs into the graph's static ones and replays. Each param group's lr becomes a device
    tensor (`set_lr` refills it) and the optimizer is made capturable; the gradients live in the graph's memory and
    are overwritten, not accumulated, by every replay (so no zero_grad between steps). Returns (loss, grad norm),
    tensors that the next call overwrites. training.config.check_step_options refuses what one graph cannot hold."""

    def __init__(self, loss_fn, optimizer, params: list, clip_grad: float | None, warmup: int = 3) -> None:
        self.loss_fn, self.optimizer, self.params, self.clip_grad, self.warmup = (
            loss_fn,
            optimizer,
            params,
            clip_grad,
            warmup,
        )
        device = params[0].device
        self.stream, self.graph, self.calls = torch.cuda.Stream(device), None, 0
        self.static_inputs: dict = {}
        self.static_outputs: tuple = ()
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    def set_lr(self, lr: float) -> None:
        """The schedule's lr for the next step, times each group's lr_scale, written into the lr tensors."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))

    def _step(self, inputs: dict) -> tuple:
        loss = self.loss_fn(inputs)
        loss.backward()
        if self.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        return loss.detach(), norm

    def __call__(self, inputs: dict) -> tuple:
        self.calls += 1
        if self.graph is None:
            current = torch.cuda.current_stream(self.stream.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):  # warm-up and capture off the default stream (torch's recipe)
                self.optimizer.zero_grad(set_to_none=True)  # capture allocates the gradients in the graph's pool
                if self.calls <= self.warmup:
                    out = self._step(inputs)
                else:
                    self.static_inputs = {k: v.clone() for k, v in inputs.items()}
                    self.graph = torch.cuda.CUDAGraph()
                    # thread_local: DALI's threads keep decoding (allocating, synchronizing) during the capture,
                    # which the default "global" mode would turn into a capture error
                    with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                        self.static_outputs = self._step(self.static_inputs)
            current.wait_stream(self.stream)
            if self.graph is None:
                return out
        for key, value in inputs.items():
            self.static_inputs[key].copy_(value)
        self.graph.replay()
        return self.static_outputs
