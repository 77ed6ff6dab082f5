"""One process's DQN, no MPI: environments (``envs``), acting (``rollout``), replay (``replay``),
networks (``networks``), the TD math (``td``), schedules (``schedule``), Adam on a flat vector
(``optim``), the hand-written MLP update (``mlp``) and greedy evaluation (``evaluate``)."""
