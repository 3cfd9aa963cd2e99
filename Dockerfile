# Filled in by the [ship] issue: multi-stage image with targets engine, router and operator.
FROM python:3.11-slim AS base
