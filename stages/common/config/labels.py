"""The label the person alarm is for: ``data.labels`` must hold it (params.py), and calibrate,
evaluate, conditions and predict find its class by it. Plain data, so the params check that
names it loads no model, picture or alarm code."""
ALARM_LABEL = "person"
