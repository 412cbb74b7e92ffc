"""HTTP route for POST /v1/fine_tuning/estimate."""

from fastapi import APIRouter

from app.deps import ProjectDep, SessionDep
from app.estimate import service as estimate_service
from app.estimate.schemas import EstimateCreate, EstimatePublic

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/estimate", response_model=EstimatePublic, operation_id="estimateFineTuning")
def estimate(body: EstimateCreate, session: SessionDep, project: ProjectDep) -> EstimatePublic:
    return estimate_service.estimate(session, project=project, body=body)
