# The image the GPU instances run: CUDA PyTorch and the RubberBand agent. Load it on the AMI and
# put a `rubberband-agent` wrapper on root's PATH that runs it with `--gpus all --network host`
# (host networking: the agent asks IMDSv2 for its instance id), as docs/user-guide.md shows.
# Add your own trainable's package the same way. No Airflow: the package's base install is the
# agent runtime, and the `torch` extra adds only torch and scikit-learn (the digits example).
# torch >= 2.6: checkpoints are loaded with torch.load(weights_only=True), which is safe from 2.6 on.
#   docker build -f docker/agent.Dockerfile -t rubberband-agent .
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
COPY . /opt/rubberband-airflow
RUN pip install --no-cache-dir "/opt/rubberband-airflow[torch]"
ENTRYPOINT ["rubberband-agent"]
