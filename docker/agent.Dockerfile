# The image the GPU instances run: CUDA PyTorch and the RubberBand agent. Bake it into an AMI
# (or start it from the AMI's user data) so that `rubberband-agent` is on the PATH at boot.
# Add your own trainable's package the same way.
#   docker build -f docker/agent.Dockerfile -t rubberband-agent .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
COPY . /opt/rubberband-airflow
RUN pip install --no-cache-dir "/opt/rubberband-airflow[torch]"
ENTRYPOINT ["rubberband-agent"]
