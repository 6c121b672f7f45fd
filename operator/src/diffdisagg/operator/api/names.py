"""API group/version/kinds/plurals, condition types and the operator's own label/annotation keys.

Every other module takes these names from here (one spelling, greppable).
"""

from __future__ import annotations

GROUP = "diffdisagg.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DDD_KIND = "DiffusionDisaggDeployment"
DDD_PLURAL = "diffusiondisaggdeployments"
DDD_SINGULAR = "diffusiondisaggdeployment"
DDD_SHORT = "ddd"

DRS_KIND = "DiffusionRoleScaler"
DRS_PLURAL = "diffusionrolescalers"
DRS_SINGULAR = "diffusionrolescaler"
DRS_SHORT = "drs"

CATEGORY = "diffdisagg"

# condition types on a DiffusionDisaggDeployment
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_DEGRADED = "Degraded"
COND_SCALERS_READY = "ScalersReady"
CONDITION_TYPES = (COND_READY, COND_PROGRESSING, COND_DEGRADED, COND_SCALERS_READY)

# label on every pod template: the deployment revision the pod was rendered for
LABEL_REVISION = "diffdisagg.io/revision"
# annotation on children: which spec generation rendered them (debugging aid, small)
ANNOTATION_GENERATION = "diffdisagg.io/spec-generation"

# field managers: everything the operator owns goes under FIELD_MANAGER; the values it sets only
# once (scaler spec.replicas, the token) go under INIT_FIELD_MANAGER so that later applies by
# FIELD_MANAGER, which omit them, never delete them (the server-side-apply trap).
FIELD_MANAGER = "diffdisagg-operator"
INIT_FIELD_MANAGER = "diffdisagg-operator-init"
