"""What a search prints while it runs: Tune's status block without its noise, numbers rounded."""

from __future__ import annotations

from leadtune.search.tuner import tidy_status

BLOCK = """== Status ==
Current time: 2026-12-07 01:35:14 (running for 00:02:31.12)
Using AsyncHyperBand: num_stopped=2
Bracket: Iter 100.000: -1.9665008268545194 | Iter 50.000: -2.4264271948563216
Current best trial: b25a395e with best_val_loss=1.9665008268545194 and parameters={'lr': 0.003}
Result logdir: /tmp/ray/session_2026-12-07/artifacts/driver_artifacts
| lead_id_f07dbe76 | RUNNING | 192.0.2.2:31497 | 0.0029447001249662944 | 2 | 0.4238683 |"""


def test_the_status_block_loses_its_noise_and_its_sixteen_digit_numbers():
    shown = tidy_status(BLOCK)
    assert "Bracket:" not in shown and "Result logdir" not in shown  # ASHA's negated cut-offs
    assert "best_val_loss=1.967 " in shown and "| 0.002945 |" in shown
    assert "| 0.4238683 |" not in shown and "| 0.4239 |" in shown
    assert "running for 00:02:31.12" in shown and "Iter" not in shown  # times left alone
    assert "192.0.2.2:31497" in shown and "b25a395e" in shown
