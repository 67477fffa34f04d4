"""Other pipeline shapes than ingest-to-storage (issue: notify and recompute with a read API, store-and-forward
senders, sliding windows): each a module with its scenario section, its strategies (naive beside improved),
its harness and its typed results, run by ``bench run`` when the scenario has its section."""
