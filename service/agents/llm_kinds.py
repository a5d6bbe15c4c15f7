"""The `kind` of every LLM request the agents send (offline handlers and replay dispatch on it)."""

TASK_ANALYSIS = "task_analysis"
EXPERT_PROPOSAL = "expert_proposal"
EXPERT_CRITIQUE = "expert_critique"
CRITIC_SCORES = "critic_scores"

ALL_KINDS = (TASK_ANALYSIS, EXPERT_PROPOSAL, EXPERT_CRITIQUE, CRITIC_SCORES)
