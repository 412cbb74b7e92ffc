"""File objects as OpenAI shapes them."""

from typing import Literal

from pydantic import BaseModel, Field


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    first_id: str | None = Field(description="Id of the first file of this page; null when it is empty.")
    last_id: str | None = Field(
        description="Id of the last file of this page, the `after` of the next one; null when it is empty."
    )
    has_more: bool = Field(description="Whether more files follow this page.")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
