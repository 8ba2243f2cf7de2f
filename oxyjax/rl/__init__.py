"""Post-training (PAPER.md section 7): rollouts from the constrained policy (`rollout`), the
unified reward mapping (`rewards`), the policy losses registered by name (`losses`), the jitted
rollout and update steps (`step`), and the entry point (`train`)."""
