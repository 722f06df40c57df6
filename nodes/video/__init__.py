"""Video files: Save Video and the MP4 writers the generators share."""
