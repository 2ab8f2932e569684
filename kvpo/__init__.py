"""kvpo: KVPO training of streaming AR video generators (routing, rollout, TVE, trainer)."""
