"""The agents: task analysis (with a method-card knowledge base), the expert discussion, the Plan."""

from service.agents.analysis import AnalysisError, analyse_task, retrieve_cards
from service.agents.discussion import (
    DEFAULT_GRAPH,
    DiscussionError,
    DiscussionEvent,
    DiscussionGraph,
    DiscussionResult,
    RoundRecord,
    run_discussion,
)
from service.agents.experts import ALL_EXPERTS, PROPOSERS, Expert
from service.agents.knowledge import KnowledgeBase, MethodCard, default_knowledge_base
from service.agents.llm_kinds import ALL_KINDS
from service.agents.offline_experts import handlers
from service.agents.plan import (
    Architecture,
    ArgumentRef,
    CustomComponent,
    Evaluation,
    Loss,
    Plan,
    PlanFieldError,
    Preprocessing,
    TaskAnalysis,
    Training,
)
from service.agents.profile_facts import ProfileFacts, ProfileFactsError, facts_from_profile

__all__ = [
    "ALL_EXPERTS",
    "ALL_KINDS",
    "DEFAULT_GRAPH",
    "AnalysisError",
    "Architecture",
    "ArgumentRef",
    "CustomComponent",
    "DiscussionError",
    "DiscussionEvent",
    "DiscussionGraph",
    "DiscussionResult",
    "Evaluation",
    "Expert",
    "KnowledgeBase",
    "Loss",
    "MethodCard",
    "PROPOSERS",
    "Plan",
    "PlanFieldError",
    "Preprocessing",
    "ProfileFacts",
    "ProfileFactsError",
    "RoundRecord",
    "TaskAnalysis",
    "Training",
    "analyse_task",
    "default_knowledge_base",
    "facts_from_profile",
    "handlers",
    "retrieve_cards",
    "run_discussion",
]
