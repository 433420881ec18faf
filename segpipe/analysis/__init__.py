"""Questions to results: regions and areas, objects across chunks, summaries against ground
truth, metrics, model evaluation, vector export."""
