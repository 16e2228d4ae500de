"""moezoo.pipelines"""
