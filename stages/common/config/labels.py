"""The label the person alarm is for: ``data.labels`` must hold it (params.py), and calibrate,
evaluate, conditions and predict find its class by it; and the names a camera mode may take
(calibrate.modes, predict --mode). Plain data, so the params check that names them loads no
model, picture or alarm code."""
import re

ALARM_LABEL = "person"
# A camera mode's name: short, and safe in a file name, a JSON key and a command line.
MODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# predict --mode auto picks a mode per picture, so no mode may be called that.
AUTO_MODE = "auto"
