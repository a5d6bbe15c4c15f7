"""What the work is: data, agents, the design pipeline, the APIs and the job store."""
